"""Devices and their sessions, and erasing an account.

`devices` holds one document per live device, `_id` = its session id:
`{user_id, device_id, name, created_at, last_seen_at, refresh_hash,
refresh_expires_at, spent: [last spent hashes], rotated_at, purge_at}`.
A unique `(user_id, device_id)` makes two racing logins pick different ids
(the loser takes the next free one); a unique `refresh_hash` finds a session
by its token; `spent` (multikey) tells a reused token from garbage; and a TTL
index on `purge_at` (a week after the refresh token expires) removes dead
sessions. Rotation is one `find_one_and_update` filtered on the presented
hash, so of two refreshes racing with one token exactly one rotates.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.base import MAX_DEVICE_ID, Record, TooManyDevices, new_id, utcnow

DEVICE_FIELDS = ("user_id", "device_id", "name", "created_at", "last_seen_at", "rotated_at")
SPENT_KEPT = 20
PURGE_AFTER = timedelta(days=7)  # an expired session is told apart from garbage for a week
DELETED_NAME = "Deleted account"


def _device(doc: dict[str, Any]) -> Record:
    return {**{k: doc.get(k) for k in DEVICE_FIELDS}, "session_id": doc["_id"]}


class DevicesMixin:
    """The device half of `MongoStorage` (collections are set up there)."""

    async def create_device(self, user_id: str, name: str, refresh_hash: str, refresh_expires_at: datetime,
                            max_devices: int) -> Record:
        # A session whose refresh token expired is gone for good: it holds no slot.
        expired = await self._devices.find({"user_id": user_id, "refresh_expires_at": {"$lte": utcnow()}},
                                           projection={"_id": 1}).to_list()
        if expired:
            await self._forget_sessions([d["_id"] for d in expired])
        while True:
            live = await self.list_devices(user_id)
            if len(live) >= max_devices:
                raise TooManyDevices(live)
            taken = {d["device_id"] for d in live}
            now = utcnow()
            doc = {"_id": new_id(), "user_id": user_id, "name": name, "created_at": now, "last_seen_at": now,
                   "device_id": next(n for n in range(1, MAX_DEVICE_ID + 1) if n not in taken),
                   "refresh_hash": refresh_hash, "refresh_expires_at": refresh_expires_at, "spent": [],
                   "rotated_at": None, "purge_at": refresh_expires_at + PURGE_AFTER}
            try:
                await self._devices.insert_one(doc)
            except DuplicateKeyError:  # a racing login took that id: look again
                continue
            # Racing logins may each have seen room for one more: the lowest ids stay.
            live = await self.list_devices(user_id)
            if len(live) > max_devices and doc["device_id"] not in [d["device_id"] for d in live[:max_devices]]:
                await self._devices.delete_one({"_id": doc["_id"]})
                raise TooManyDevices(live[:max_devices])
            return _device(doc)

    async def list_devices(self, user_id: str) -> list[Record]:
        cursor = self._devices.find({"user_id": user_id}, sort=[("device_id", ASCENDING)])
        return [_device(d) for d in await cursor.to_list()]

    async def get_session(self, session_id: str) -> Record | None:
        doc = await self._devices.find_one({"_id": session_id})
        return _device(doc) if doc else None

    async def session_of_refresh(self, refresh_hash: str) -> Record | None:
        doc = await self._devices.find_one({"refresh_hash": refresh_hash})
        return _device(doc) if doc else None

    async def touch_device(self, session_id: str, at: datetime) -> None:
        await self._devices.update_one({"_id": session_id}, {"$set": {"last_seen_at": at}})

    async def rotate_refresh(self, refresh_hash: str, new_hash: str, new_expires_at: datetime,
                             now: datetime) -> tuple[str, Record | None]:
        doc = await self._devices.find_one_and_update(
            {"refresh_hash": refresh_hash, "refresh_expires_at": {"$gt": now}},
            {"$set": {"refresh_hash": new_hash, "refresh_expires_at": new_expires_at, "rotated_at": now,
                      "purge_at": new_expires_at + PURGE_AFTER},
             "$push": {"spent": {"$each": [refresh_hash], "$slice": -SPENT_KEPT}}},
            return_document=ReturnDocument.AFTER)
        if doc is not None:
            return "rotated", _device(doc)
        doc = await self._devices.find_one({"spent": refresh_hash})
        if doc is not None:
            return "spent", _device(doc)
        doc = await self._devices.find_one({"refresh_hash": refresh_hash})
        return ("expired", _device(doc)) if doc is not None else ("unknown", None)

    async def renew_session(self, session_id: str, refresh_hash: str, refresh_expires_at: datetime) -> Record | None:
        doc = await self._devices.find_one_and_update(
            {"_id": session_id}, {"$set": {"refresh_hash": refresh_hash, "refresh_expires_at": refresh_expires_at,
                                           "purge_at": refresh_expires_at + PURGE_AFTER}},
            return_document=ReturnDocument.AFTER)
        return _device(doc) if doc else None

    async def revoke_devices(self, user_id: str, device_id: int | None = None,
                             keep_session: str | None = None) -> list[Record]:
        query: dict[str, Any] = {"user_id": user_id}
        if device_id is not None:
            query["device_id"] = device_id
        if keep_session is not None:
            query["_id"] = {"$ne": keep_session}
        gone = await self._devices.find(query).to_list()
        if gone:
            await self._forget_sessions([d["_id"] for d in gone])
        return [_device(d) for d in gone]

    async def _forget_sessions(self, session_ids: list[str]) -> None:
        """Delete these devices and their one-time prekeys (their bundles are in the device)."""
        await self._devices.delete_many({"_id": {"$in": session_ids}})
        await self._prekeys.delete_many({"session_id": {"$in": session_ids}})

    # -- accounts ----------------------------------------------------------------------
    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        await self._users.update_one({"_id": user_id}, {"$set": {"password_hash": password_hash}})

    async def delete_user(self, user_id: str) -> None:
        # Each step is idempotent, so an interrupted deletion is finished by running it again.
        await self._users.update_one({"_id": user_id}, {"$set": {"deleted": True, "display_name": DELETED_NAME},
                                                        "$unset": {"password_hash": ""}})
        await self.revoke_devices(user_id)
        await self._presence.delete_one({"_id": user_id})
        async for doc in self._messages.find({"sender_id": user_id, "blob_id": {"$ne": None}},
                                             projection={"blob_id": 1}):
            await self.delete_blob(doc["blob_id"])
        await self._messages.update_many(
            {"sender_id": user_id, "tombstone": {"$exists": False}},
            {"$set": {"ciphertext": None, "content": None, "blob_id": None, "tombstone": "sender_deleted"}})
        await self._conversations.update_many(
            {"last_message.sender_id": user_id},
            {"$set": {"last_message.content": None, "last_message.tombstone": "sender_deleted"}})
