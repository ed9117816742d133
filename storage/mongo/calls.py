"""Calls: atomic busy detection with per-user line documents, CAS transitions.

`call_lines` holds one document per user, `{_id: user_id, live: [{call_id,
at}]}`: the calls that user is a party to while they are pending or accepted.

`create_call(caller, callee)` claims the callee's line with one conditional
upsert, `update_one({_id: callee, live: {$size: 0}}, {$push: ...}, upsert)`:
it matches only a free line, and when the line is busy the upsert collides on
`_id`, so of any number of racing callers exactly one gets the line. The
winner then adds the call to the caller's line (unconditionally: a caller may
be in several calls, as in the memory backend) and inserts the call, pending.
A loser records its call as final `busy` at once.

A transition to a final status is a compare-and-set on the call
(`find_one_and_update` filtered on `status: {$in: from_statuses}`); the winner
then frees both lines. A line entry can outlive its call (a process died
between the two writes), so a claim that finds the line busy checks each
entry and drops those whose call is final, or missing for longer than
`ORPHAN_AFTER` (a call being created right now is not missing for long).

Without multi-document transactions the caller's line is taken just after the
callee's, so two people calling each other at the same instant ("glare") can
both get a pending call, where the memory backend would make the second busy.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.base import FINAL_CALL_STATUSES, LIVE_CALL_STATUSES, Record, new_id, utcnow
from storage.mongo import records

ORPHAN_AFTER = timedelta(seconds=30)
CLAIM_ATTEMPTS = 3


class CallsMixin:
    """The call half of `MongoStorage` (collections are set up there)."""

    async def create_call(self, caller_id: str, callee_id: str, media: str,
                          ring_deadline: datetime) -> Record:
        call_id = new_id()
        now = utcnow()
        entry = {"call_id": call_id, "at": now}
        claimed = await self._claim_line(callee_id, entry)
        doc = {"_id": call_id, "caller_id": caller_id, "callee_id": callee_id, "media": media,
               "status": "pending" if claimed else "busy", "created_at": now,
               "ring_deadline": ring_deadline, "answered_at": None,
               "ended_at": None if claimed else now, "end_reason": None if claimed else "busy",
               "ended_by": None, "parties": [caller_id, callee_id]}
        try:
            if claimed:
                await self._lines.update_one({"_id": caller_id}, {"$push": {"live": entry}}, upsert=True)
            await self._calls.insert_one(doc)
        except Exception:
            if claimed:
                await self._free_lines([caller_id, callee_id], call_id)
            raise
        return records.call(doc)

    async def _claim_line(self, user_id: str, entry: Record) -> bool:
        for _ in range(CLAIM_ATTEMPTS):
            try:
                await self._lines.update_one({"_id": user_id, "live": {"$size": 0}},
                                             {"$push": {"live": entry}}, upsert=True)
                return True
            except DuplicateKeyError:
                pass  # the line exists and is not free
            line = await self._lines.find_one({"_id": user_id})
            if line is None or not line.get("live"):
                continue  # freed meanwhile: try again
            stale = await self._stale_entries(line["live"])
            if len(stale) < len(line["live"]):
                return False  # a live call holds the line: busy
            await self._lines.update_one({"_id": user_id},
                                         {"$pull": {"live": {"call_id": {"$in": stale}}}})
        return False

    async def _stale_entries(self, entries: list[Record]) -> list[str]:
        ids = [e["call_id"] for e in entries]
        found = {d["_id"]: d["status"] for d in
                 await self._calls.find({"_id": {"$in": ids}}, projection={"status": 1}).to_list()}
        cutoff = utcnow() - ORPHAN_AFTER
        return [e["call_id"] for e in entries
                if found.get(e["call_id"]) in FINAL_CALL_STATUSES
                or (e["call_id"] not in found and e["at"] < cutoff)]

    async def _free_lines(self, user_ids: list[str], call_id: str) -> None:
        await self._lines.update_many({"_id": {"$in": user_ids}},
                                      {"$pull": {"live": {"call_id": call_id}}})

    async def get_call(self, call_id: str) -> Record | None:
        doc = await self._calls.find_one({"_id": call_id})
        return records.call(doc) if doc else None

    async def transition_call(self, call_id: str, from_statuses: tuple[str, ...], to_status: str,
                              fields: Record) -> Record | None:
        update = {k: v for k, v in fields.items() if k not in ("id", "_id", "parties")}
        update["status"] = to_status
        doc = await self._calls.find_one_and_update(
            {"_id": call_id, "status": {"$in": list(from_statuses)}}, {"$set": update},
            return_document=ReturnDocument.AFTER)
        if doc is None:
            return None
        if to_status not in LIVE_CALL_STATUSES:
            await self._free_lines([doc["caller_id"], doc["callee_id"]], call_id)
        return records.call(doc)

    async def list_active_calls(self, user_id: str) -> list[Record]:
        return await self._calls_of(user_id, LIVE_CALL_STATUSES, 0, None)

    async def list_call_history(self, user_id: str, limit: int,
                                before: tuple[datetime, str] | None = None) -> list[Record]:
        if limit <= 0:
            return []
        return await self._calls_of(user_id, FINAL_CALL_STATUSES, limit, before)

    async def _calls_of(self, user_id: str, statuses: tuple[str, ...], limit: int,
                        before: tuple[datetime, str] | None) -> list[Record]:
        query: dict = {"parties": user_id, "status": {"$in": list(statuses)}}
        if before is not None:
            at, last_id = before
            query["$or"] = [{"created_at": {"$lt": at}}, {"created_at": at, "_id": {"$lt": last_id}}]
        cursor = self._calls.find(query, sort=[("created_at", DESCENDING), ("_id", DESCENDING)],
                                  limit=limit)
        return [records.call(d) for d in await cursor.to_list()]

    async def forget_calls(self, ended_before: datetime) -> int:
        gone = await self._calls.delete_many({"ended_at": {"$ne": None, "$lt": ended_before}})  # see forget_messages
        return gone.deleted_count

    async def due_pending_calls(self, now: datetime) -> list[Record]:
        cursor = self._calls.find({"status": "pending", "ring_deadline": {"$lte": now}})
        return [records.call(d) for d in await cursor.to_list()]
