"""Messages: gap-free `seq` per conversation and idempotent sends, without transactions.

`add_message(conversation, sender, client_message_id, ...)`:

1. If the sender already has a message with that client id, return it (the
   normal retry path; `messages` has a unique `(sender_id, client_message_id)`).
2. Otherwise *reserve* the client id: insert `{_id: "<sender>:<client id>",
   message_id}` into `message_ids`. The `_id` is unique, so exactly one of any
   number of racing identical sends wins the reservation.
3. Only the winner allocates a seq: one `find_one_and_update` on the
   conversation with an aggregation-pipeline update that does `last_seq + 1`
   and, in the same atomic write, sets `last_activity_at` and `last_message`
   (metadata: no ciphertext, no blob id) with that seq. The server serializes
   writes to one document, so seqs are handed out 1, 2, 3, ... with no gap, and
   `last_message` is always the message with the highest seq, whatever order
   the inserts finish in.
4. The winner inserts the message under the reserved id.

Losers never allocate a seq (allocating first and discovering the duplicate
afterwards would burn a number), so they cannot leave a gap: they poll for the
message by `(sender_id, client_message_id)` with a short backoff. A reservation
whose message never appeared within `RESERVATION_STALE` (its process died
between steps 2 and 4) is taken over by compare-and-set, so a retry after a
crash is not stuck. The only way to leave a gap is a process dying (or losing
the database for longer than `RESERVATION_STALE`) between steps 3 and 4; a
late insert then hits the unique index and the original message is returned.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.base import Record, new_id, utcnow
from storage.mongo import records

log = logging.getLogger("kisse.storage.mongo")

RESERVATION_STALE = timedelta(seconds=30)


class MessagesMixin:
    """The message half of `MongoStorage` (collections are set up there)."""

    async def add_message(self, conversation_id: str, sender_id: str, client_message_id: str,
                          ciphertext: bytes | None, content: Record | None) -> tuple[Record, bool]:
        key = f"{sender_id}:{client_message_id}"  # ids are hex, so ":" cannot collide
        delay = 0.002
        while True:
            existing = await self._messages.find_one({"sender_id": sender_id,
                                                      "client_message_id": client_message_id})
            if existing is not None:
                return records.message(existing), False
            message_id = new_id()
            if await self._reserve(key, message_id):
                return await self._append(key, message_id, conversation_id, sender_id,
                                          client_message_id, ciphertext, content)
            # Someone else is sending this very message: wait for it to land.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _reserve(self, key: str, message_id: str) -> bool:
        now = utcnow()
        try:
            await self._message_ids.insert_one({"_id": key, "message_id": message_id, "claimed_at": now})
            return True
        except DuplicateKeyError:
            pass
        held = await self._message_ids.find_one({"_id": key})
        if held is None or held["claimed_at"] > now - RESERVATION_STALE:
            return False  # released just now (retry) or in flight (wait)
        # Stale: its owner died before inserting. Take it over, compare-and-set.
        taken = await self._message_ids.find_one_and_update(
            {"_id": key, "message_id": held["message_id"]},
            {"$set": {"message_id": message_id, "claimed_at": now}})
        if taken is not None:
            log.warning("took over a stale send reservation %s", key)
        return taken is not None

    async def _append(self, key: str, message_id: str, conversation_id: str, sender_id: str,
                      client_message_id: str, ciphertext: bytes | None,
                      content: Record | None) -> tuple[Record, bool]:
        now = utcnow()
        meta = {"id": message_id, "conversation_id": conversation_id, "sender_id": sender_id,
                "client_message_id": client_message_id, "created_at": now,
                "content": dict(content) if content else None}
        try:
            conversation = await self._conversations.find_one_and_update(
                {"_id": conversation_id},
                # `$literal` so a client id starting with "$" is never read as a field path.
                [{"$set": {"last_seq": {"$add": ["$last_seq", 1]}, "last_activity_at": {"$literal": now}}},
                 {"$set": {"last_message": {"$mergeObjects": [{"$literal": meta}, {"seq": "$last_seq"}]}}}],
                projection={"last_seq": 1}, return_document=ReturnDocument.AFTER)
        except Exception:
            await self._release(key, message_id)
            raise
        if conversation is None:
            await self._release(key, message_id)
            raise KeyError(conversation_id)
        doc = {"_id": message_id, "conversation_id": conversation_id, "sender_id": sender_id,
               "seq": conversation["last_seq"], "client_message_id": client_message_id,
               "created_at": now, "content": meta["content"], "ciphertext": ciphertext, "blob_id": None}
        try:
            await self._messages.insert_one(doc)
        except DuplicateKeyError:
            # Only after a reservation takeover raced a very slow original.
            log.warning("late duplicate send %s left seq %d unused", key, doc["seq"])
            existing = await self._messages.find_one({"sender_id": sender_id,
                                                      "client_message_id": client_message_id})
            if existing is None:
                raise
            return records.message(existing), False
        return records.message(doc), True

    async def _release(self, key: str, message_id: str) -> None:
        try:
            await self._message_ids.delete_one({"_id": key, "message_id": message_id})
        except Exception:  # best effort: a stale reservation is taken over later anyway
            log.warning("could not release send reservation %s", key, exc_info=True)

    async def get_message(self, message_id: str) -> Record | None:
        doc = await self._messages.find_one({"_id": message_id})
        return records.message(doc) if doc else None

    async def list_messages(self, conversation_id: str, *, before: int | None = None,
                            after: int | None = None, limit: int = 50) -> tuple[list[Record], bool]:
        if limit <= 0:
            return [], False  # pragma: no cover - callers validate limits
        if after is not None:
            cursor = self._messages.find({"conversation_id": conversation_id, "seq": {"$gt": after}},
                                         sort=[("seq", ASCENDING)], limit=limit + 1)
            docs = await cursor.to_list()
            return [records.message(d) for d in docs[:limit]], len(docs) > limit
        query: dict = {"conversation_id": conversation_id}
        if before is not None:
            query["seq"] = {"$lt": before}
        docs = await self._messages.find(query, sort=[("seq", DESCENDING)], limit=limit + 1).to_list()
        page = [records.message(d) for d in reversed(docs[:limit])]
        return page, len(docs) > limit

    async def attach_content(self, message_id: str, blob_id: str, size: int, sha256: str) -> Record:
        content = {"size": size, "sha256": sha256, "inline": False}
        doc = await self._messages.find_one_and_update(
            {"_id": message_id, "content": None}, {"$set": {"content": content, "blob_id": blob_id}},
            return_document=ReturnDocument.AFTER)
        if doc is None:
            doc = await self._messages.find_one({"_id": message_id})
            if doc is None:
                raise KeyError(message_id)
            return records.message(doc)
        # last_message is always the highest-seq message, so this matches
        # "the conversation's last_seq is this message's seq".
        await self._conversations.update_one(
            {"_id": doc["conversation_id"], "last_message.id": message_id},
            {"$set": {"last_message.content": content}})
        return records.message(doc)

    async def count_unread(self, conversation_id: str, user_id: str, after_seq: int) -> int:
        return await self._messages.count_documents(
            {"conversation_id": conversation_id, "seq": {"$gt": after_seq}, "sender_id": {"$ne": user_id}})
