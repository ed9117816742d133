"""Ordered, versioned schema migrations for the MongoDB backend.

State lives in the `meta` collection:

* `{_id: "schema", version: N, applied: [{version, name, applied_at}, ...]}`
  records what ran, once per version;
* `{_id: "migration_lock", owner, expires_at}` is a lease. A process takes it
  with one `find_one_and_update` filtered on "free or expired" (upsert: when
  it is held, the upsert collides on `_id` and the process waits), so two
  processes starting at once never run a migration concurrently. The lease
  expires, so a process that died holding it does not block the others.

Each migration is also idempotent (creating an index that exists with the
same options is a no-op), so re-running one after a crash mid-way is safe.
Add a migration by appending to `MIGRATIONS`; never edit or reorder old ones.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from pymongo import ASCENDING as ASC, DESCENDING as DESC, IndexModel, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure

from storage.base import StorageUnavailable, new_id, utcnow

log = logging.getLogger("kisse.storage.mongo")

LOCK_LEASE = timedelta(seconds=60)
LOCK_WAIT_SECONDS = 60.0
# Reservations of (sender, client_message_id) are only needed while a send is
# in flight; the message's own unique index keeps sends idempotent after that.
RESERVATION_TTL_SECONDS = 24 * 3600

Migration = Callable[[AsyncDatabase], Awaitable[None]]


async def _users_and_conversations(db: AsyncDatabase) -> None:
    # Usernames are unique case-insensitively: a lower-cased copy carries the
    # unique index (no collation needed, so every server and mongoeco agree).
    await db.users.create_indexes([IndexModel([("username_lower", ASC)], unique=True,
                                              name="username_lower_unique")])
    await db.conversations.create_indexes([
        # One direct conversation per pair: "<min id>:<max id>", absent on groups.
        IndexModel([("direct_key", ASC)], unique=True, sparse=True, name="direct_key_unique"),
        IndexModel([("participant_ids", ASC), ("last_activity_at", DESC), ("_id", DESC)],
                   name="member_recent"),
    ])


async def _messages_and_receipts(db: AsyncDatabase) -> None:
    await db.messages.create_indexes([
        IndexModel([("conversation_id", ASC), ("seq", ASC)], unique=True, name="conversation_seq_unique"),
        IndexModel([("sender_id", ASC), ("client_message_id", ASC)], unique=True,
                   name="sender_client_id_unique"),
    ])
    await db.message_ids.create_indexes([
        IndexModel([("claimed_at", ASC)], expireAfterSeconds=RESERVATION_TTL_SECONDS,
                   name="claimed_at_ttl"),
    ])
    await db.receipts.create_indexes([IndexModel([("conversation_id", ASC)], name="conversation")])


async def _calls(db: AsyncDatabase) -> None:
    await db.calls.create_indexes([
        # `parties` = [caller_id, callee_id]: active calls and history by user and time.
        IndexModel([("parties", ASC), ("status", ASC), ("created_at", DESC), ("_id", DESC)],
                   name="party_status_recent"),
        IndexModel([("status", ASC), ("ring_deadline", ASC)], name="status_ring_deadline"),
    ])


async def _blobs(db: AsyncDatabase) -> None:
    # The indexes GridFS drivers create lazily; made up front so the first
    # upload after a deploy does not pay for them.
    await db["encrypted_content.files"].create_indexes([
        IndexModel([("filename", ASC), ("uploadDate", ASC)], name="filename_1_uploadDate_1")])
    await db["encrypted_content.chunks"].create_indexes([
        IndexModel([("files_id", ASC), ("n", ASC)], unique=True, name="files_id_1_n_1")])


async def _numbered_after_writing(db: AsyncDatabase) -> None:
    # Messages are written first and numbered after (storage.mongo.messages): a
    # pending message has no seq and a tombstone no sender, so both unique
    # indexes only cover the documents that have the fields. Reservations are gone.
    for name in ("conversation_seq_unique", "sender_client_id_unique"):
        try:
            await db.messages.drop_index(name)
        except OperationFailure:  # dropped already by an earlier, interrupted run
            pass
    await db.messages.create_indexes([
        IndexModel([("conversation_id", ASC), ("seq", ASC)], unique=True, name="conversation_seq_unique",
                   partialFilterExpression={"seq": {"$exists": True}}),
        IndexModel([("sender_id", ASC), ("client_message_id", ASC)], unique=True, name="sender_client_id_unique",
                   partialFilterExpression={"client_message_id": {"$exists": True}}),
        IndexModel([("pending_since", ASC)], sparse=True, name="pending_since"),
    ])
    await db.message_ids.drop()


async def _devices(db: AsyncDatabase) -> None:
    await db.devices.create_indexes([
        IndexModel([("user_id", ASC), ("device_id", ASC)], unique=True, name="user_device_unique"),
        IndexModel([("refresh_hash", ASC)], unique=True, name="refresh_hash_unique"),
        IndexModel([("spent", ASC)], name="spent"),
        IndexModel([("purge_at", ASC)], expireAfterSeconds=0, name="purge_at_ttl"),
    ])


async def _late_allocations(db: AsyncDatabase) -> None:
    # The send repair looks for `pending` entries older than a few seconds.
    await db.conversations.create_indexes([IndexModel([("pending.at", ASC)], sparse=True, name="pending_at")])


async def _consent(db: AsyncDatabase) -> None:
    # Conversations from before requests existed: everyone had accepted, and a
    # group's creator is its admin.
    await db.conversations.update_many({"requests": {"$exists": False}}, [{"$set": {
        "requests": [], "former": [],
        "admins": {"$cond": [{"$eq": ["$kind", "group"]}, ["$created_by"], []]}}}])
    await db.conversations.create_indexes([IndexModel([("requests", ASC)], name="requests")])
    await db.blocks.create_indexes([IndexModel([("blocker", ASC), ("blocked_at", ASC)], name="blocker"),
                                    IndexModel([("blocked", ASC)], name="blocked")])


async def _prekeys(db: AsyncDatabase) -> None:
    # Claims filter on (session, kind) and take the lowest key id; uploads check ids.
    await db.prekeys.create_indexes([IndexModel([("session_id", ASC), ("kind", ASC), ("key_id", ASC)],
                                                unique=True, name="session_kind_key_unique")])


async def _forgetting(db: AsyncDatabase) -> None:
    # The sweep finds expired messages (and, with retention, old messages and calls) by
    # these. The TTL index is a backstop an hour late, for when no Kisse process sweeps:
    # it drops the document (inline ciphertext with it) but not a GridFS blob.
    await db.messages.create_indexes([
        IndexModel([("expires_at", ASC)], expireAfterSeconds=3600, name="expires_at_ttl"),
        IndexModel([("created_at", ASC)], name="created_at")])
    await db.calls.create_indexes([IndexModel([("ended_at", ASC)], name="ended_at")])


MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "users and conversations indexes", _users_and_conversations),
    (2, "messages, client-id reservations and receipts indexes", _messages_and_receipts),
    (3, "calls indexes", _calls),
    (4, "gridfs encrypted_content indexes", _blobs),
    (5, "messages numbered after they are written", _numbered_after_writing),
    (6, "devices and their sessions", _devices),
    (7, "pending seq allocations by age", _late_allocations),
    (8, "message requests, group admins and blocks", _consent),
    (9, "one-time prekeys of the key directory", _prekeys),
    (10, "disappearing messages and retention", _forgetting),
]
LATEST_VERSION = MIGRATIONS[-1][0]


async def schema_version(db: AsyncDatabase) -> int:
    doc = await db.meta.find_one({"_id": "schema"})
    return int(doc["version"]) if doc else 0


async def migrate(db: AsyncDatabase) -> int:
    """Bring the database to `LATEST_VERSION`; return how many migrations this call ran."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + LOCK_WAIT_SECONDS
    owner = new_id()
    delay = 0.02
    while True:
        if await schema_version(db) >= LATEST_VERSION:
            return 0
        if await _acquire(db, owner):
            try:
                return await _run_pending(db, owner)
            finally:
                await db.meta.update_one({"_id": "migration_lock", "owner": owner},
                                         {"$set": {"owner": None, "expires_at": None}})
        if loop.time() > give_up:
            raise StorageUnavailable("another process holds the migration lock")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def _acquire(db: AsyncDatabase, owner: str) -> bool:
    now = utcnow()
    try:
        doc = await db.meta.find_one_and_update(
            {"_id": "migration_lock", "$or": [{"owner": None}, {"expires_at": {"$lt": now}}]},
            {"$set": {"owner": owner, "expires_at": now + LOCK_LEASE}},
            upsert=True, return_document=ReturnDocument.AFTER)
    except DuplicateKeyError:  # held by someone else: the upsert collided
        return False
    return doc is not None and doc.get("owner") == owner


async def _run_pending(db: AsyncDatabase, owner: str) -> int:
    ran = 0
    current = await schema_version(db)  # re-read under the lock
    for version, name, step in MIGRATIONS:
        if version <= current:
            continue
        log.info("applying migration %d: %s", version, name)
        await step(db)
        now = utcnow()
        await db.meta.update_one(
            {"_id": "schema"},
            {"$set": {"version": version}, "$push": {"applied": {"version": version, "name": name,
                                                                 "applied_at": now}}},
            upsert=True)
        # Renew the lease between steps so a long migration keeps it.
        await db.meta.update_one({"_id": "migration_lock", "owner": owner},
                                 {"$set": {"expires_at": now + LOCK_LEASE}})
        ran += 1
    return ran
