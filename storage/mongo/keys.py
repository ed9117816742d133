"""The key directory: public Signal-protocol keys, per device session.

A device's bundle (registration id, identity key, signed prekey, last-resort
PQ prekey) lives in its `devices` document, under `keys`, so it goes with the
device. The one-time prekeys are one `prekeys` document each:
`{session_id, kind: "ec" | "pq", key_id, public_key, signature}`, unique on
`(session_id, kind, key_id)`. A claim is one `find_one_and_delete`, so each
key is handed out once however many claims race, and the same index serves
the claim's filter and sort and the counts.
"""
from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import BulkWriteError

from storage.base import PrekeyIdTaken, Record, TooManyPrekeys, new_id, utcnow

DUPLICATE_KEY = 11000


def _prekey(doc: dict[str, Any]) -> Record:
    key = {"key_id": doc["key_id"], "public_key": doc["public_key"]}
    if doc.get("signature") is not None:
        key["signature"] = doc["signature"]
    return key


class KeysMixin:
    """The key directory half of `MongoStorage` (collections are set up there)."""

    async def set_key_bundle(self, session_id: str, bundle: Record) -> tuple[bool, bytes | None]:
        before = await self._devices.find_one_and_update(
            {"_id": session_id}, {"$set": {"keys": bundle}}, projection={"keys.identity_key": 1},
            return_document=ReturnDocument.BEFORE)
        if before is None:
            return False, None
        previous = (before.get("keys") or {}).get("identity_key")
        if previous is not None and previous != bundle["identity_key"]:
            await self._prekeys.delete_many({"session_id": session_id})
        return True, previous

    async def key_bundles(self, user_id: str) -> list[Record]:
        cursor = self._devices.find({"user_id": user_id, "keys": {"$exists": True},
                                     "refresh_expires_at": {"$gt": utcnow()}},
                                    projection={"device_id": 1, "keys": 1}, sort=[("device_id", ASCENDING)])
        return [{**doc["keys"], "device_id": doc["device_id"], "session_id": doc["_id"]}
                async for doc in cursor]

    async def add_prekeys(self, session_id: str, pools: dict[str, list[Record]], max_keys: int) -> bool:
        docs: list[dict[str, Any]] = []
        for kind, keys in pools.items():  # every check first: all or none
            pool = {"session_id": session_id, "kind": kind}
            held = {doc["key_id"]: _prekey(doc) async for doc in self._prekeys.find(
                {**pool, "key_id": {"$in": [k["key_id"] for k in keys]}})}
            if any(key["key_id"] in held and held[key["key_id"]] != key for key in keys):
                raise PrekeyIdTaken(kind)
            new = [{"_id": new_id(), **pool, "key_id": k["key_id"], "public_key": k["public_key"],
                    "signature": k.get("signature")} for k in keys if k["key_id"] not in held]
            if new and await self._prekeys.count_documents(pool) + len(new) > max_keys:
                raise TooManyPrekeys(kind)
            docs += new
        if not docs:
            return await self._devices.find_one({"_id": session_id}, projection={"_id": 1}) is not None
        ours = {"_id": {"$in": [d["_id"] for d in docs]}}
        try:
            await self._prekeys.insert_many(docs, ordered=False)
        except BulkWriteError as error:  # a racing upload of the same ids: all or none
            await self._prekeys.delete_many(ours)
            errors = error.details.get("writeErrors", ())
            if errors and all(e.get("code") == DUPLICATE_KEY for e in errors):
                raise PrekeyIdTaken(docs[errors[0]["index"]]["kind"]) from None
            raise
        # Racing uploads may each have seen room; and a device revoked meanwhile keeps nothing.
        for kind in {d["kind"] for d in docs}:
            if await self._prekeys.count_documents({"session_id": session_id, "kind": kind}) > max_keys:
                await self._prekeys.delete_many(ours)
                raise TooManyPrekeys(kind)
        if await self._devices.find_one({"_id": session_id}, projection={"_id": 1}) is None:
            await self._prekeys.delete_many({"session_id": session_id})
            return False
        return True

    async def count_prekeys(self, session_id: str) -> dict[str, int] | None:
        if await self._devices.find_one({"_id": session_id, "keys": {"$exists": True}}, projection={"_id": 1}) is None:
            return None
        return {kind: await self._prekeys.count_documents({"session_id": session_id, "kind": kind})
                for kind in ("ec", "pq")}

    async def take_prekey(self, session_id: str, kind: str) -> Record | None:
        doc = await self._prekeys.find_one_and_delete({"session_id": session_id, "kind": kind},
                                                       sort=[("key_id", ASCENDING)])
        return _prekey(doc) if doc else None
