"""Conversations and their history."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import messaging, schemas
from kisse.views import parse_page_cursor

LIST_MAX = 100


class ConversationsHandler(APIHandler):
    BODIES = {"POST": schemas.CREATE_CONVERSATION}
    async def get(self) -> None:
        limit = self.query_int("limit", 50, minimum=1, maximum=LIST_MAX)
        before = parse_page_cursor(self.get_query_argument("before", None))
        assert limit is not None
        self.send_json(await messaging.list_conversations(self.rt, self.user_id, limit, before))

    async def post(self) -> None:
        body = self.json_body()
        view, created = await messaging.create_conversation(
            self.rt, self.user_id, body["participant_ids"], body.get("title"))
        self.send_json({"conversation": view}, status=201 if created else 200)


class ConversationHandler(APIHandler):
    async def get(self, conversation_id: str) -> None:
        conversation = await messaging.member_conversation(self.rt, self.user_id, conversation_id)
        self.send_json({"conversation": await messaging.conversation_view(self.rt, conversation, self.user_id)})


class HistoryHandler(APIHandler):
    async def get(self, conversation_id: str) -> None:
        limit = self.query_int("limit", messaging.HISTORY_DEFAULT, minimum=1, maximum=messaging.HISTORY_MAX)
        before = self.query_int("before", None, minimum=1)
        after = self.query_int("after", None, minimum=0)
        assert limit is not None
        self.send_json(await messaging.history(self.rt, self.user_id, conversation_id, before, after, limit))


routes = [
    (r"/api/conversations", ConversationsHandler),
    (r"/api/conversations/([^/]+)", ConversationHandler),
    (r"/api/conversations/([^/]+)/messages", HistoryHandler),
]
