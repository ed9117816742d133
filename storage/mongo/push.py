"""Push registrations: one per device, in its `devices` document (`push`), so a
signed-out device's registration goes with it."""
from __future__ import annotations

from storage.base import Record, utcnow


class PushMixin:
    """The push half of `MongoStorage` (collections are set up there)."""

    async def set_push(self, session_id: str, registration: Record | None) -> bool:
        done = await self._devices.update_one({"_id": session_id}, {"$set": {"push": registration}})
        return done.matched_count == 1

    async def drop_push(self, session_id: str, registration: Record) -> None:
        await self._devices.update_one({"_id": session_id, "push": registration}, {"$set": {"push": None}})

    async def push_registrations(self, user_ids: list[str]) -> list[Record]:
        cursor = self._devices.find({"user_id": {"$in": list(dict.fromkeys(user_ids))}, "push": {"$ne": None},
                                     "refresh_expires_at": {"$gt": utcnow()}},
                                    projection={"user_id": 1, "device_id": 1, "push": 1})
        return [{"user_id": d["user_id"], "device_id": d["device_id"], "session_id": d["_id"], "push": d["push"]}
                async for d in cursor if d.get("push")]
