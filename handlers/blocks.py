"""Blocking: the blocked user can no longer reach you, and is never told."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import contacts, schemas


class BlockHandler(APIHandler):
    BODIES = {"POST": schemas.EMPTY}

    async def post(self, user_id: str) -> None:
        self.json_body()
        await contacts.block(self.rt, self.user_id, user_id)
        self.send_empty()

    async def delete(self, user_id: str) -> None:
        await contacts.unblock(self.rt, self.user_id, user_id)
        self.send_empty()


class BlocksHandler(APIHandler):
    async def get(self) -> None:
        self.send_json(await contacts.list_blocks(self.rt, self.user_id))


routes = [(r"/api/users/([^/]+)/block", BlockHandler), (r"/api/blocks", BlocksHandler)]
