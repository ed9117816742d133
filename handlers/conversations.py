"""Conversations and their history."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import membership, messaging, schemas
from kisse.errors import BadRequest
from kisse.views import parse_page_cursor

LIST_MAX = 100


class ConversationsHandler(APIHandler):
    BODIES = {"POST": schemas.CREATE_CONVERSATION}
    async def get(self) -> None:
        limit = self.query_int("limit", 50, minimum=1, maximum=LIST_MAX)
        before = parse_page_cursor(self.get_query_argument("before", None))
        assert limit is not None
        filter = self.get_query_argument("filter", "accepted")
        if filter not in schemas.CONVERSATION_FILTERS:
            raise BadRequest(f"filter is one of {', '.join(schemas.CONVERSATION_FILTERS)}", code="invalid_query")
        self.send_json(await messaging.list_conversations(self.rt, self.user_id, limit, before, filter))

    async def post(self) -> None:
        body = self.json_body()
        view, created = await messaging.create_conversation(
            self.rt, self.user_id, body["participant_ids"], body.get("title"))
        self.send_json({"conversation": view}, status=201 if created else 200)


class ConversationHandler(APIHandler):
    BODIES = {"PATCH": schemas.UPDATE_CONVERSATION}

    async def get(self, conversation_id: str) -> None:
        conversation = await messaging.member_conversation(self.rt, self.user_id, conversation_id, former=True)
        self.send_json({"conversation": await messaging.conversation_view(self.rt, conversation, self.user_id)})

    async def patch(self, conversation_id: str) -> None:
        body = self.json_body()
        answer = None
        if "message_ttl" in body:
            membership.check_message_ttl(self.rt, body["message_ttl"])  # before the title changes
        if "title" in body:  # a group's admins only: checked first, so a refusal changes nothing
            answer = await membership.set_title(self.rt, self.user_id, conversation_id, body["title"])
        if "message_ttl" in body:
            answer = await membership.set_message_ttl(self.rt, self.user_id, conversation_id, body["message_ttl"])
        if answer is None:
            answer = {"conversation": await messaging.conversation_view(
                self.rt, await messaging.member_conversation(self.rt, self.user_id, conversation_id), self.user_id)}
        self.send_json(answer)


class AcceptHandler(APIHandler):
    BODIES = {"POST": schemas.EMPTY}

    async def post(self, conversation_id: str) -> None:
        self.json_body()
        self.send_json({"conversation": await membership.accept(self.rt, self.user_id, conversation_id)})


class DeclineHandler(APIHandler):
    BODIES = {"POST": schemas.EMPTY}

    async def post(self, conversation_id: str) -> None:
        self.json_body()
        await membership.decline(self.rt, self.user_id, conversation_id)
        self.send_empty()


class LeaveHandler(APIHandler):
    BODIES = {"POST": schemas.EMPTY}

    async def post(self, conversation_id: str) -> None:
        self.json_body()
        await membership.leave(self.rt, self.user_id, conversation_id)
        self.send_empty()


class MembersHandler(APIHandler):
    BODIES = {"POST": schemas.ADD_MEMBERS}

    async def post(self, conversation_id: str) -> None:
        body = self.json_body()
        self.send_json(await membership.add_members(self.rt, self.user_id, conversation_id, body["user_ids"]))


class MemberHandler(APIHandler):
    BODIES = {"PATCH": schemas.SET_ROLE}

    async def patch(self, conversation_id: str, user_id: str) -> None:
        body = self.json_body()
        self.send_json(await membership.set_role(self.rt, self.user_id, conversation_id, user_id, body["role"]))

    async def delete(self, conversation_id: str, user_id: str) -> None:
        await membership.remove_member(self.rt, self.user_id, conversation_id, user_id)
        self.send_empty()


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
    (r"/api/conversations/([^/]+)/accept", AcceptHandler),
    (r"/api/conversations/([^/]+)/decline", DeclineHandler),
    (r"/api/conversations/([^/]+)/leave", LeaveHandler),
    (r"/api/conversations/([^/]+)/members", MembersHandler),
    (r"/api/conversations/([^/]+)/members/([^/]+)", MemberHandler),
]
