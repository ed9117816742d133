"""The key directory: a device uploads its public Signal-protocol keys; senders claim bundles."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import keys, schemas
from kisse.errors import NotFound
from storage.base import MAX_DEVICE_ID


class MyKeysHandler(APIHandler):
    BODIES = {"PUT": schemas.UPLOAD_KEYS}

    async def get(self) -> None:
        self.send_json(await keys.counts(self.rt, self.me))

    async def put(self) -> None:
        self.send_json(await keys.upload(self.rt, self.me, self.json_body()))


class PrekeysHandler(APIHandler):
    BODIES = {"POST": schemas.ADD_PREKEYS}

    async def post(self) -> None:
        self.send_json(await keys.add_prekeys(self.rt, self.me, self.json_body()))


class ClaimHandler(APIHandler):
    async def get(self, user_id: str, device_id: str | None = None) -> None:
        device = None
        if device_id is not None:
            if not device_id.isascii() or not device_id.isdigit() or len(device_id) > 3 or int(device_id) > MAX_DEVICE_ID:
                raise NotFound("no such device in the key directory", code="device_not_found")
            device = int(device_id)
        self.send_json(await keys.claim(self.rt, self.me, user_id, device))


routes = [
    (r"/api/keys", MyKeysHandler),
    (r"/api/keys/prekeys", PrekeysHandler),
    (r"/api/keys/([^/]+)", ClaimHandler),
    (r"/api/keys/([^/]+)/([^/]+)", ClaimHandler),
]
