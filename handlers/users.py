"""Finding people to talk to."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import messaging

SEARCH_MAX = 50


class UsersHandler(APIHandler):
    async def get(self) -> None:
        query = self.get_query_argument("q", "").strip()
        limit = self.query_int("limit", 20, minimum=1, maximum=SEARCH_MAX)
        assert limit is not None
        await self.rt.limits.hit("search", self.user_id)
        self.send_json(await messaging.search_users(self.rt, query, limit, self.get_query_argument("after", None)))


class UserHandler(APIHandler):
    async def get(self, user_id: str) -> None:
        self.send_json({"user": await messaging.get_user(self.rt, user_id)})


routes = [(r"/api/users", UsersHandler), (r"/api/users/([^/]+)", UserHandler)]
