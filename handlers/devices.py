"""The caller's devices: list them, sign one out."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import sessions
from kisse.errors import NotFound


class DevicesHandler(APIHandler):
    async def get(self) -> None:
        self.send_json(await sessions.list_devices(self.rt, self.me))


class DeviceHandler(APIHandler):
    async def delete(self, device_id: str) -> None:
        if not device_id.isascii() or not device_id.isdigit() or len(device_id) > 3:
            raise NotFound("no such device", code="device_not_found")
        await sessions.remove_device(self.rt, self.me, int(device_id))
        self.send_empty()


routes = [(r"/api/devices", DevicesHandler), (r"/api/devices/([^/]+)", DeviceHandler)]
