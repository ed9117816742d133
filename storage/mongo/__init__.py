"""The MongoDB backend: PyMongo's async API (`AsyncMongoClient`) and GridFS.

Motor is deprecated; PyMongo's own async API is its successor and the only
driver used here. One `MongoStorage(url)` per process: the database comes from
the URL path (default `kisse`). Collections:

* `users` - `_id`, username, `username_lower` (unique), display_name, password_hash, created_at
* `conversations` - the conversation record (membership included, see
  `storage.mongo.conversations`) plus `direct_key` ("<a>:<b>", unique, direct only)
* `blocks` - one document per (blocker, blocked), `_id` "<blocker>:<blocked>"
* `messages` - message records (pending ones have `pending_since` and no `seq`, see
  `storage.mongo.messages`); unique `(conversation_id, seq)` and `(sender_id, client_message_id)`
* `receipts` - one cursor document per (conversation, user), `_id` "<conversation>:<user>"
* `user_presence` - `_id` = user id
* `calls`, `call_lines` - see `storage.mongo.calls`
* `devices` - devices and their sessions (refresh token hashes), see `storage.mongo.devices`
* `meta` - schema version and migration lock (see `storage.mongo.migrations`)
* GridFS bucket `encrypted_content` - blobs (see `storage.mongo.blobs`)

Writes that hand out numbers or decide races (conversations, messages,
calls, call_lines, devices, blocks) use majority write concern unless the URL
sets `w=`, so a failover cannot roll back a seq or a call transition.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pymongo
import pymongo.errors as errors
from gridfs import AsyncGridFSBucket
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, WriteConcern
from pymongo.errors import DuplicateKeyError

from storage.base import (
    BlobWriter, ReceiptKind, Record, Storage, StorageUnavailable, UsernameTaken, new_id, utcnow,
)
from storage.mongo import blobs, migrations, records
from storage.mongo.calls import CallsMixin
from storage.mongo.conversations import ConversationsMixin
from storage.mongo.devices import DevicesMixin
from storage.mongo.keys import KeysMixin
from storage.mongo.push import PushMixin
from storage.mongo.messages import MessagesMixin

__all__ = ["MongoStorage"]

# Client options used unless the URL sets them (URL options win).
DEFAULT_OPTIONS: dict[str, Any] = {
    # One budget per operation, and (see `bounded`) per Storage call, however many
    # round trips it makes: a request fails with 503 within seconds, never after
    # several driver timeouts stacked. `timeoutMS=` in the URL changes it.
    "timeoutMS": 3000,
    "serverSelectionTimeoutMS": 3000,
    "connectTimeoutMS": 3000,
    "retryWrites": True,
    "retryReads": True,
    "appname": "kisse",
}
CRITICAL_COLLECTIONS = ("conversations", "messages", "calls", "call_lines", "devices", "blocks", "prekeys")


def client_options(url: str) -> dict[str, Any]:
    """Keyword options for `AsyncMongoClient(url, ...)`: the defaults the URL does
    not override (keywords would beat URL options), plus timezone-aware UTC dates."""
    given = {key.lower() for key, _ in parse_qsl(urlsplit(url).query)}
    options = {k: v for k, v in DEFAULT_OPTIONS.items() if k.lower() not in given}
    options.update(tz_aware=True, tzinfo=timezone.utc)
    return options


def bounded(cls: type) -> type:
    """Run each of the class's `Storage` methods under one `pymongo.timeout`: the
    whole call, all its round trips together, gets the operation budget."""
    for name in Storage.__abstractmethods__ | {"repair_sends", "start"}:
        method = getattr(cls, name)
        if not inspect.iscoroutinefunction(method) or name == "close":
            continue

        def wrap(method: Any) -> Any:
            @functools.wraps(method)
            async def within_budget(self: "MongoStorage", *args: Any, **kwargs: Any) -> Any:
                if self.closed:
                    raise StorageUnavailable("storage is closed: the server is shutting down")
                try:
                    with pymongo.timeout(self.operation_timeout):
                        return await method(self, *args, **kwargs)
                except errors.InvalidOperation:
                    if self.closed:  # closed under a request the shutdown's grace cut short
                        raise StorageUnavailable("storage is closed: the server is shutting down") from None
                    raise
            return within_budget
        setattr(cls, name, wrap(method))
    return cls


@bounded
class MongoStorage(ConversationsMixin, MessagesMixin, CallsMixin, DevicesMixin, KeysMixin, PushMixin, Storage):
    """Kisse's storage on MongoDB (or anything speaking its wire protocol)."""

    unavailable_errors = (
        StorageUnavailable,
        errors.ConnectionFailure,          # AutoReconnect, NotPrimaryError, NetworkTimeout, ...
        errors.ServerSelectionTimeoutError,
        errors.NetworkTimeout,
        errors.AutoReconnect,
        errors.WaitQueueTimeoutError,
        errors.ExecutionTimeout,
        errors.WTimeoutError,              # majority not reached in time
    )

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self._client: AsyncMongoClient = AsyncMongoClient(url, **{**client_options(url), **options})
        self.operation_timeout: float | None = self._client.options.timeout
        self.closed = False
        self.db = self._client.get_default_database(default="kisse")
        url_sets_w = any(k.lower() == "w" for k, _ in parse_qsl(urlsplit(url).query))
        majority = None if url_sets_w else WriteConcern("majority")

        def collection(name: str):
            return self.db.get_collection(name, write_concern=majority if name in CRITICAL_COLLECTIONS else None)

        self._users = collection("users")
        self._conversations = collection("conversations")
        self._messages = collection("messages")
        self._receipts = collection("receipts")
        self._presence = collection("user_presence")
        self._calls = collection("calls")
        self._devices = collection("devices")
        self._lines = collection("call_lines")
        self._blocks = collection("blocks")
        self._prekeys = collection("prekeys")
        self._leases = collection("leases")
        self._bucket = AsyncGridFSBucket(self.db, bucket_name=blobs.BUCKET_NAME)
        self.stats: dict[str, int] = {"blob_writes": 0, "largest_blob_write": 0}

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        """Run pending migrations (safe when several processes start at once)."""
        await migrations.migrate(self.db)

    async def ping(self) -> None:
        try:
            await self.db.command("ping")
        except errors.PyMongoError as exc:
            raise StorageUnavailable(f"MongoDB unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        self.closed = True
        await self._client.close()

    # -- users ---------------------------------------------------------------
    async def create_user(self, username: str, password_hash: str, display_name: str) -> Record:
        doc = {"_id": new_id(), "username": username, "username_lower": username.lower(),
               "display_name": display_name, "created_at": utcnow(), "password_hash": password_hash,
               "deleted": False}
        try:
            await self._users.insert_one(doc)
        except DuplicateKeyError:
            raise UsernameTaken(username) from None
        return records.user(doc)

    async def get_user(self, user_id: str) -> Record | None:
        doc = await self._users.find_one({"_id": user_id})
        return records.user(doc) if doc else None

    async def get_users(self, user_ids: list[str]) -> list[Record]:
        wanted = list(dict.fromkeys(user_ids))
        if not wanted:
            return []
        return [records.user(d) for d in await self._users.find({"_id": {"$in": wanted}}).to_list()]

    async def get_credentials(self, username: str) -> tuple[Record, str] | None:
        doc = await self._users.find_one({"username_lower": username.lower(), "deleted": {"$ne": True}})
        return (records.user(doc), doc["password_hash"]) if doc else None

    async def search_users(self, prefix: str, limit: int, after: str | None = None) -> list[Record]:
        if limit <= 0:
            return []
        # A range scan on the unique index: [prefix, prefix with its last char bumped).
        bounds: dict[str, Any] = {"$gte": prefix}
        if prefix and ord(prefix[-1]) < 0x10FFFF:
            bounds["$lt"] = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        if after is not None:
            bounds["$gt"] = after
        cursor = self._users.find({"username_lower": bounds, "deleted": {"$ne": True}},
                                  sort=[("username_lower", ASCENDING)], limit=limit)
        return [records.user(d) for d in await cursor.to_list() if d["username_lower"].startswith(prefix)]

    # -- receipts ------------------------------------------------------------
    async def advance_receipt(self, conversation_id: str, user_id: str, kind: ReceiptKind,
                              seq: int) -> tuple[Record, Record]:
        # $max never moves a cursor back; on insert it also creates the field. The
        # document from before the update tells how far it moved, in one round trip.
        read_seq = seq if kind == "read" else 0
        update = {"$max": {"delivered_seq": seq, "read_seq": read_seq},
                  "$setOnInsert": {"conversation_id": conversation_id, "user_id": user_id}}
        old = await _upsert(self._receipts, f"{conversation_id}:{user_id}", update, ReturnDocument.BEFORE)
        before = {"delivered_seq": old["delivered_seq"], "read_seq": old["read_seq"]} if old else \
            {"delivered_seq": 0, "read_seq": 0}
        return {"user_id": user_id, "delivered_seq": max(before["delivered_seq"], seq),
                "read_seq": max(before["read_seq"], read_seq)}, before

    async def get_receipts(self, conversation_id: str) -> dict[str, Record]:
        cursor = self._receipts.find({"conversation_id": conversation_id})
        return {d["user_id"]: {"user_id": d["user_id"], "delivered_seq": d["delivered_seq"],
                               "read_seq": d["read_seq"]} async for d in cursor}

    # -- blobs ---------------------------------------------------------------
    async def open_blob_writer(self, max_size: int) -> BlobWriter:
        return blobs.MongoBlobWriter(self._bucket, max_size, self.stats)

    def read_blob(self, blob_id: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        return blobs.read_blob(self._bucket, blob_id, start, end)

    async def delete_blob(self, blob_id: str) -> None:
        await blobs.delete_blob(self._bucket, blob_id)

    # -- presence ------------------------------------------------------------
    async def take_lease(self, name: str, owner: str, seconds: float) -> bool:
        now = utcnow()
        try:
            await self._leases.update_one(
                {"_id": name, "$or": [{"owner": owner}, {"until": {"$lt": now}}]},
                {"$set": {"owner": owner, "until": now + timedelta(seconds=seconds)}}, upsert=True)
        except DuplicateKeyError:  # held by another owner: the upsert's insert collides
            return False
        return True

    async def get_presences(self, user_ids: list[str]) -> dict[str, Record]:
        return {doc["_id"]: _presence(doc) async for doc in self._presence.find({"_id": {"$in": list(user_ids)}})}

    async def set_presence(self, user_id: str, *, status: str | None = None,
                           last_seen: datetime | None = None, show_last_seen: bool | None = None) -> Record:
        changes = {k: v for k, v in (("status", status), ("last_seen", last_seen), ("show_last_seen", show_last_seen))
                   if v is not None}
        defaults = {k: v for k, v in (("status", "online"), ("last_seen", None), ("show_last_seen", True))
                    if k not in changes}
        update: dict[str, Any] = {}
        if changes:
            update["$set"] = changes
        if defaults:
            update["$setOnInsert"] = defaults
        return _presence(await _upsert(self._presence, user_id, update))


def _presence(doc: dict[str, Any]) -> Record:
    return {"user_id": doc["_id"], "status": doc.get("status", "online"), "last_seen": doc.get("last_seen"),
            "show_last_seen": doc.get("show_last_seen", True)}


async def _upsert(collection: Any, key: str, update: dict[str, Any],
                  returned: bool = ReturnDocument.AFTER) -> dict[str, Any] | None:
    """`find_one_and_update(upsert=True)` returning the new document (or the old
    one, None if there was none). Two first writers can race on the insert; the
    loser's retry then updates the winner's."""
    try:
        return await collection.find_one_and_update({"_id": key}, update, upsert=True, return_document=returned)
    except DuplicateKeyError:
        return await collection.find_one_and_update({"_id": key}, update, upsert=True, return_document=returned)
