"""Messages: gap-free `seq` per conversation and idempotent sends, without transactions.

`add_message(conversation, sender, client_message_id, ...)` has three steps,
each one atomic on one document, and any attempt can finish what another
(dead) attempt started:

1. **Write the message, unnumbered**: insert it with `pending_since` and no
   `seq`. `messages` has a unique `(sender_id, client_message_id)`, so of any
   number of racing identical sends one document exists. A send that finds it
   carries on with that document (step 2), numbered or not.
2. **Allocate its number** on the conversation with one `find_one_and_update`
   (an aggregation-pipeline update): unless the conversation's `pending` list
   already holds this message id, `last_seq + 1`, append `{id, seq, at}` to
   `pending`, and set `last_activity_at` and `last_message` (metadata, no
   bytes) with that seq. The server serializes writes to one document, so seqs
   are handed out 1, 2, 3, ... and **a message gets one number, ever**: a
   second attempt for the same message gets the same one back.
3. **Number the message**: set `seq` and unset `pending_since`, filtered on
   `pending_since` existing (compare-and-set: exactly one attempt "creates" the
   message, and only that one publishes it). Then drop the `pending` entry.

Invariant: every seq up to `last_seq` belongs to exactly one message, which
is either numbered, or pending with that number in `pending`, or a
*tombstone* (below). Crash windows: a process dying after step 1 leaves a
pending message without a number, after step 2 one with a number but not
numbered, after step 3 a `pending` entry to drop. None leaves a hole: a retry
of the send (same client id) runs the steps again and finishes at once, and
`repair_sends` finishes pending messages older than a few seconds whose
sender never came back. Until then the slot is invisible (history and
catch-up skip unnumbered messages), never lost.

One race burns a number: a twin attempt that allocates after the first one
has numbered the message and dropped its `pending` entry gets a fresh seq it
cannot use. If that seq is still the conversation's last, it gives it back
(compare-and-set on `last_seq`); if someone else has been numbered since, it
fills the slot with a tombstone (`tombstone: "unused"`, no sender, no
content), which history and catch-up return, so a client can always tell
"nothing here" from "lost". The twin may also be nobody: an allocation that
reached the server after its client timed out (a storage stall longer than
timeoutMS) leaves an entry no attempt will release; `repair_sends` releases
`pending` entries of numbered messages once they are a few seconds old, the
same way.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from collections.abc import Iterable
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage import faults
from storage.base import Record, new_id, utcnow
from storage.mongo import records

NUMBERED = {"seq": {"$exists": True}}


def _unexpired() -> dict[str, Any]:
    """A query part: messages with no expiry, or one still ahead."""
    return {"$or": [{"expires_at": None}, {"expires_at": {"$gt": utcnow()}}]}


class MessagesMixin:
    """The message half of `MongoStorage` (collections are set up there)."""

    async def add_message(self, conversation_id: str, sender_id: str, client_message_id: str,
                          ciphertext: bytes | None, content: Record | None,
                          ttl: int | None = None) -> tuple[Record, bool]:
        now = utcnow()
        # `ttl` is kept until the message is numbered: it expires that long after its number.
        doc = {"_id": new_id(), "conversation_id": conversation_id, "sender_id": sender_id,
               "client_message_id": client_message_id, "created_at": now,
               "content": dict(content) if content else None, "ciphertext": ciphertext, "blob_id": None,
               "pending_since": now, "ttl": ttl}
        try:
            await self._messages.insert_one(doc)
        except DuplicateKeyError:  # this send was made before (a retry, or a racing twin)
            existing = await self._messages.find_one({"sender_id": sender_id, "client_message_id": client_message_id})
            if existing is None:
                raise
            if "pending_since" not in existing or existing["conversation_id"] != conversation_id:
                return records.message(existing), False
            doc = existing
        faults.point("mongo.send.written")
        return await self._number(doc)

    async def _number(self, doc: dict[str, Any]) -> tuple[Record, bool]:
        """Steps 2 and 3 for a pending message: `(message, whether this call numbered it)`."""
        message_id, conversation_id = doc["_id"], doc["conversation_id"]
        meta = {"id": message_id, "conversation_id": conversation_id, "sender_id": doc["sender_id"],
                "client_message_id": doc["client_message_id"], "content": doc["content"]}
        ttl = doc.get("ttl")
        seq, at, fresh = await self._allocate(conversation_id, message_id, meta, ttl)
        faults.point("mongo.send.allocated")
        # created_at is the time of the number, so it follows seq and matches last_activity_at.
        expires_at = at + timedelta(seconds=ttl) if ttl else None
        numbered = await self._messages.find_one_and_update(
            {"_id": message_id, "pending_since": {"$exists": True}},
            {"$set": {"seq": seq, "created_at": at, "expires_at": expires_at},
             "$unset": {"pending_since": "", "ttl": ""}},
            return_document=ReturnDocument.AFTER)
        faults.point("mongo.send.numbered")
        if numbered is not None:
            await self._conversations.update_one({"_id": conversation_id},
                                                 {"$pull": {"pending": {"id": message_id}}})
            return records.message(numbered), True
        existing = await self._messages.find_one({"_id": message_id})
        if existing is None:
            raise KeyError(message_id)
        await self._release(conversation_id, message_id, seq, existing.get("seq"))
        return records.message(existing), False

    async def _release(self, conversation_id: str, message_id: str, seq: int, real_seq: int | None) -> None:
        """Drop the `pending` entry `(message_id, seq)` of a message numbered already
        (`real_seq`; None if it is gone), and bury `seq` if it was not the message's.
        The entry is pulled compare-and-set: of a twin and `repair_sends` that both
        find it, only the one that removed it buries, so a seq is buried once."""
        pulled = await self._conversations.update_one(
            {"_id": conversation_id, "pending": {"$elemMatch": {"id": message_id, "seq": seq}}},
            {"$pull": {"pending": {"id": message_id, "seq": seq}}})
        if pulled.modified_count and seq != real_seq:
            await self._bury(conversation_id, seq, real_seq)

    async def _bury(self, conversation_id: str, seq: int, real_seq: int | None) -> None:
        """Give a burnt seq back if it is still the last one handed out (the usual case:
        identical sends racing, nobody else sending); else fill it with a tombstone.
        Either way `last_message` points back at the real message (numbered `real_seq`)."""
        if real_seq is not None:
            given_back = await self._conversations.find_one_and_update(
                {"_id": conversation_id, "last_seq": seq},
                {"$set": {"last_seq": seq - 1, "last_message.seq": real_seq}})
            if given_back is not None:
                return
        try:
            await self._messages.insert_one({"_id": new_id(), "conversation_id": conversation_id, "seq": seq,
                                             "created_at": utcnow(), "tombstone": "unused", "content": None})
        except DuplicateKeyError:
            pass  # buried already
        if real_seq is not None:
            await self._conversations.update_one(
                {"_id": conversation_id, "last_message.seq": seq}, {"$set": {"last_message.seq": real_seq}})

    async def _allocate(self, conversation_id: str, message_id: str, meta: Record,
                        ttl: int | None = None) -> tuple[int, datetime, bool]:
        """This message's seq in its conversation, when it was handed out, and whether
        it is new (else the one the message got before)."""
        literal_id, now = {"$literal": message_id}, utcnow()
        meta = {**meta, "expires_at": now + timedelta(seconds=ttl) if ttl else None}
        known = {"$in": [literal_id, {"$ifNull": ["$pending.id", []]}]}
        conversation = await self._conversations.find_one_and_update(
            {"_id": conversation_id},
            # `$literal` so an id or client id starting with "$" is never read as a field path.
            [{"$set": {"_known": known}},
             {"$set": {"last_seq": {"$cond": ["$_known", "$last_seq", {"$add": ["$last_seq", 1]}]}}},
             {"$set": {
                 "pending": {"$cond": ["$_known", "$pending", {"$concatArrays": [
                     {"$ifNull": ["$pending", []]},
                     [{"id": literal_id, "seq": "$last_seq", "at": {"$literal": now}}]]}]},
                 "last_activity_at": {"$cond": ["$_known", "$last_activity_at", {"$literal": now}]},
                 "last_message": {"$cond": ["$_known", "$last_message", {"$mergeObjects": [
                     {"$literal": meta}, {"seq": "$last_seq", "created_at": {"$literal": now}}]}]}}},
             {"$unset": "_known"}],
            projection={"pending": 1, "last_seq": 1}, return_document=ReturnDocument.BEFORE)
        if conversation is None:
            raise KeyError(conversation_id)
        for entry in conversation.get("pending") or ():
            if entry["id"] == message_id:
                return entry["seq"], entry["at"], False
        return conversation["last_seq"] + 1, now, True

    async def repair_sends(self, older_than: datetime,
                           in_flight: set[tuple[str, str]] = frozenset()) -> list[Record]:  # type: ignore[assignment]
        """Number the messages left pending since before `older_than` (their sender's
        attempt died and was not retried), then bury the seqs handed out too late to
        messages numbered already; return the messages this call numbered."""
        repaired = []
        async for doc in self._messages.find({"pending_since": {"$lt": older_than}}).sort("pending_since", ASCENDING):
            if (doc["sender_id"], doc["client_message_id"]) in in_flight:
                continue  # a slow attempt of this process: it finishes itself
            message, numbered = await self._number(doc)
            if numbered:
                repaired.append(message)
        # A late allocation: an attempt whose step 2 reached the server after its
        # client gave up (a stall longer than the timeout), once a retry had numbered
        # the message. Its entry holds a seq nobody will number.
        async for conversation in self._conversations.find({"pending.at": {"$lt": older_than}},
                                                            projection={"pending": 1}):
            for entry in conversation["pending"]:
                if entry["at"] >= older_than:
                    continue
                message = await self._messages.find_one({"_id": entry["id"]}, projection={"seq": 1, "pending_since": 1})
                if message is not None and "pending_since" in message:
                    continue  # its sender's attempt is still running: it finishes itself
                await self._release(conversation["_id"], entry["id"], entry["seq"],
                                    message.get("seq") if message else None)
        return repaired

    async def get_message(self, message_id: str) -> Record | None:
        doc = await self._messages.find_one({"_id": message_id, **NUMBERED, **_unexpired()})
        return records.message(doc) if doc else None

    async def list_messages(self, conversation_id: str, *, before: int | None = None,
                            after: int | None = None, limit: int = 50) -> tuple[list[Record], bool]:
        if limit <= 0:
            return [], False  # pragma: no cover - callers validate limits
        if after is not None:
            cursor = self._messages.find({"conversation_id": conversation_id, "seq": {"$gt": after}, **_unexpired()},
                                         sort=[("seq", ASCENDING)], limit=limit + 1)
            docs = await cursor.to_list()
            return [records.message(d) for d in docs[:limit]], len(docs) > limit
        query: dict = {"conversation_id": conversation_id, "seq": {"$gte": 1}, **_unexpired()}
        if before is not None:
            query["seq"]["$lt"] = before
        docs = await self._messages.find(query, sort=[("seq", DESCENDING)], limit=limit + 1).to_list()
        page = [records.message(d) for d in reversed(docs[:limit])]
        return page, len(docs) > limit

    async def attach_content(self, message_id: str, blob_id: str, size: int, sha256: str) -> Record:
        content = {"size": size, "sha256": sha256, "inline": False}
        doc = await self._messages.find_one_and_update(
            {"_id": message_id, "content": None, **NUMBERED}, {"$set": {"content": content, "blob_id": blob_id}},
            return_document=ReturnDocument.AFTER)
        if doc is None:
            doc = await self._messages.find_one({"_id": message_id, **NUMBERED})
            if doc is None:
                raise KeyError(message_id)
            return records.message(doc)
        # last_message is always the highest-seq message, so this matches
        # "the conversation's last_seq is this message's seq".
        await self._conversations.update_one(
            {"_id": doc["conversation_id"], "last_message.id": message_id},
            {"$set": {"last_message.content": content}})
        return records.message(doc)

    async def count_unread(self, conversation_id: str, user_id: str, after_seq: int,
                           ignoring: Iterable[str] = ()) -> int:
        return await self._messages.count_documents(
            {"conversation_id": conversation_id, "seq": {"$gt": after_seq},
             "sender_id": {"$nin": [user_id, *ignoring]}, "tombstone": {"$exists": False}, **_unexpired()})

    async def forget_messages(self, now: datetime, created_before: datetime | None = None,
                              limit: int = 1000) -> int:
        # `$ne: None` as well: a real MongoDB never orders null before a date, mongoeco does.
        due: dict[str, Any] = {"expires_at": {"$ne": None, "$lte": now}}
        if created_before is not None:
            due = {"$or": [due, {"created_at": {"$lt": created_before}, **NUMBERED}]}
        docs = await self._messages.find(due, projection={"conversation_id": 1, "blob_id": 1},
                                         limit=limit).to_list()
        if not docs:
            return 0
        for doc in docs:  # the blob first: a message never points at a blob that is gone
            if doc.get("blob_id"):
                await self.delete_blob(doc["blob_id"])
        gone = [d["_id"] for d in docs]
        await self._messages.delete_many({"_id": {"$in": gone}})
        for conversation_id in {d["conversation_id"] for d in docs}:
            newest = await self._messages.find_one({"conversation_id": conversation_id, "seq": {"$gte": 1}},
                                                   sort=[("seq", DESCENDING)])
            last = None if newest is None else {k: v for k, v in records.message(newest).items()
                                                if k not in ("ciphertext", "blob_id")}
            # Compare-and-set: a message sent meanwhile is the last one, and stays it.
            await self._conversations.update_one({"_id": conversation_id, "last_message.id": {"$in": gone}},
                                                 {"$set": {"last_message": last}})
        return len(docs)
