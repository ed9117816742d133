"""Calls over REST: start, answer, end, list; TURN credentials."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import calls, schemas
from kisse.views import call_view, parse_page_cursor

ACTIONS = {"accept": calls.accept, "reject": calls.reject, "cancel": calls.cancel, "end": calls.end}
HISTORY_MAX = 100


class CallsHandler(APIHandler):
    BODIES = {"POST": schemas.START_CALL}
    async def post(self) -> None:
        body = self.json_body()
        view = await calls.start_call(self.rt, self.user_id, body["callee_id"], body["media"])
        self.send_json({"call": view}, status=201)


class CallActionHandler(APIHandler):
    BODIES = {"POST": schemas.EMPTY}
    async def post(self, call_id: str, action: str) -> None:
        self.json_body()
        self.send_json({"call": await ACTIONS[action](self.rt, self.user_id, call_id)})


class CallHandler(APIHandler):
    async def get(self, call_id: str) -> None:
        self.send_json({"call": call_view(await calls.party_call(self.rt, self.user_id, call_id))})


class ActiveCallsHandler(APIHandler):
    async def get(self) -> None:
        self.send_json(await calls.active(self.rt, self.user_id))


class CallHistoryHandler(APIHandler):
    async def get(self) -> None:
        limit = self.query_int("limit", 50, minimum=1, maximum=HISTORY_MAX)
        assert limit is not None
        before = parse_page_cursor(self.get_query_argument("before", None))
        self.send_json(await calls.history(self.rt, self.user_id, limit, before))


class TurnHandler(APIHandler):
    async def get(self) -> None:
        self.send_json(await calls.turn_credentials(self.rt, self.user_id))


routes = [
    (r"/api/calls", CallsHandler),
    (r"/api/calls/active", ActiveCallsHandler),
    (r"/api/calls/history", CallHistoryHandler),
    (r"/api/calls/turn", TurnHandler),
    (r"/api/calls/([^/]+)/(accept|reject|cancel|end)", CallActionHandler),
    (r"/api/calls/([^/]+)", CallHandler),
]
