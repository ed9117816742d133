"""Push registrations: how a sleeping device is woken (kisse/push)."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import schemas
from kisse.push import registrations


class PushHandler(APIHandler):
    BODIES = {"PUT": schemas.SET_PUSH}

    async def put(self) -> None:
        await registrations.register(self.rt, self.me, self.json_body())
        self.send_empty()

    async def delete(self) -> None:
        await registrations.unregister(self.rt, self.me)
        self.send_empty()


class VapidHandler(APIHandler):
    auth_required = False  # a web client subscribes before it logs in

    async def get(self) -> None:
        self.send_json(registrations.vapid_key(self.rt))


routes = [(r"/api/push", PushHandler), (r"/api/push/vapid", VapidHandler)]
