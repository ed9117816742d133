"""Presence: set your own status, read a contact's."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import presence, schemas


class PresenceHandler(APIHandler):
    BODIES = {"POST": schemas.SET_PRESENCE}
    async def post(self) -> None:
        body = self.json_body()
        self.send_json({"presence": await presence.set_status(self.rt, self.user_id, body.get("status"),
                                                              body.get("show_last_seen"))})


class UserPresenceHandler(APIHandler):
    async def get(self, user_id: str) -> None:
        self.send_json({"presence": await presence.get_for(self.rt, self.user_id, user_id)})


routes = [(r"/api/presence", PresenceHandler), (r"/api/presence/([^/]+)", UserPresenceHandler)]
