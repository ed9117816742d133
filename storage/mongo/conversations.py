"""Conversations, their membership, and blocks.

A conversation document holds its membership: `participant_ids` (members, in
the order they joined), `requests` (members who have not accepted), `admins`
and `former` (`[{user_id, up_to_seq}]`). Every change of membership is one
`find_one_and_update` on that document (an aggregation-pipeline update where
the new value depends on the old one), so racing adds, removals and leaves
apply one after the other and none is lost. `blocks` holds one document per
(blocker, blocked) pair, `_id` "blocker:blocked", indexed both ways.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.base import Record, new_id, utcnow
from storage.mongo import records

AFTER = ReturnDocument.AFTER


def _not_in(value: Any, array: Any) -> dict[str, Any]:
    # MongoDB would take `{$not: [{$in: ...}]}`; mongoeco knows no $not expression.
    return {"$eq": [{"$in": [value, array]}, False]}


def _without(field: str, user_ids: Any) -> dict[str, Any]:
    """The array `field` without the ids in `user_ids` (an expression), order kept."""
    return {"$filter": {"input": {"$ifNull": [f"${field}", []]}, "cond": _not_in("$$this", user_ids)}}


def _former_without(user_ids: Any) -> dict[str, Any]:
    return {"$filter": {"input": {"$ifNull": ["$former", []]}, "cond": _not_in("$$this.user_id", user_ids)}}


class ConversationsMixin:
    """The conversation half of `MongoStorage` (collections are set up there)."""

    def _new_conversation(self, kind: str, creator_id: str, participant_ids: list[str],
                          title: str | None) -> dict[str, Any]:
        now = utcnow()
        return {"_id": new_id(), "kind": kind, "participant_ids": list(participant_ids),
                "requests": [m for m in participant_ids if m != creator_id],
                "admins": [creator_id] if kind == "group" else [], "former": [], "title": title,
                "created_by": creator_id, "created_at": now, "last_activity_at": now, "last_seq": 0,
                "last_message": None, "message_ttl": None}

    async def get_or_create_direct(self, creator_id: str, other_id: str) -> tuple[Record, bool]:
        key = ":".join(sorted((creator_id, other_id)))
        existing = await self._conversations.find_one({"direct_key": key})
        if existing is None:
            doc = self._new_conversation("direct", creator_id, [creator_id, other_id], None)
            doc["direct_key"] = key
            try:
                await self._conversations.insert_one(doc)
                return records.conversation(doc), True
            except DuplicateKeyError:  # lost the race to create it
                existing = await self._conversations.find_one({"direct_key": key})
                if existing is None:
                    raise
        members, requests = existing["participant_ids"], existing.get("requests", [])
        if creator_id in members and other_id in members and creator_id not in requests:
            return records.conversation(existing), False
        me, other = {"$literal": creator_id}, {"$literal": other_id}
        me_in, other_in = {"$in": [me, "$participant_ids"]}, {"$in": [other, "$participant_ids"]}
        doc = await self._conversations.find_one_and_update({"_id": existing["_id"]}, [
            {"$set": {
                "participant_ids": {"$concatArrays": ["$participant_ids", {"$cond": [me_in, [], [me]]},
                                                      {"$cond": [other_in, [], [other]]}]},
                "requests": {"$concatArrays": [_without("requests", [me]), {"$cond": [other_in, [], [other]]}]},
                "former": _former_without([me, other])}}], return_document=AFTER)
        return records.conversation(doc), False

    async def create_group(self, creator_id: str, participant_ids: list[str], title: str | None) -> Record:
        doc = self._new_conversation("group", creator_id, participant_ids, title)
        await self._conversations.insert_one(doc)
        return records.conversation(doc)

    async def get_conversation(self, conversation_id: str) -> Record | None:
        doc = await self._conversations.find_one({"_id": conversation_id})
        return records.conversation(doc) if doc else None

    async def list_conversations(self, user_id: str, limit: int, before: tuple[datetime, str] | None = None,
                                 filter: str = "all") -> list[Record]:
        if limit <= 0:
            return []
        query: dict[str, Any] = {"participant_ids": user_id}
        if filter == "requests":
            query["requests"] = user_id
        elif filter == "accepted":
            query["requests"] = {"$ne": user_id}
        if before is not None:
            at, last_id = before
            query["$or"] = [{"last_activity_at": {"$lt": at}},
                            {"last_activity_at": at, "_id": {"$lt": last_id}}]
        cursor = self._conversations.find(
            query, sort=[("last_activity_at", DESCENDING), ("_id", DESCENDING)], limit=limit)
        return [records.conversation(d) for d in await cursor.to_list()]

    async def _change(self, conversation_id: str, user_id: str | None, update: Any) -> Record | None:
        """Apply `update` to the conversation (if `user_id` is a member, when given)."""
        query: dict[str, Any] = {"_id": conversation_id}
        if user_id is not None:
            query["participant_ids"] = user_id
        doc = await self._conversations.find_one_and_update(query, update, return_document=AFTER)
        return records.conversation(doc) if doc else None

    async def accept_conversation(self, conversation_id: str, user_id: str) -> Record | None:
        return await self._change(conversation_id, user_id, {"$pull": {"requests": user_id}})

    async def leave_conversation(self, conversation_id: str, user_id: str) -> Record | None:
        me = [{"$literal": user_id}]
        accepted = {"$filter": {"input": "$_members", "cond": _not_in("$$this", "$_requests")}}
        heir = {"$arrayElemAt": [{"$concatArrays": [accepted, "$_members"]}, 0]}
        orphaned = {"$and": [{"$eq": ["$kind", "group"]}, {"$eq": [{"$size": "$_admins"}, 0]},
                             {"$gt": [{"$size": "$_members"}, 0]}]}
        return await self._change(conversation_id, user_id, [
            {"$set": {"_members": _without("participant_ids", me), "_requests": _without("requests", me),
                      "_admins": _without("admins", me)}},
            {"$set": {"participant_ids": "$_members", "requests": "$_requests",
                      "admins": {"$cond": [orphaned, [heir], "$_admins"]},
                      "former": {"$concatArrays": [_former_without(me),
                                                   [{"user_id": me[0], "up_to_seq": "$last_seq",
                                                     "title": "$title", "left_at": {"$literal": utcnow()}}]]}}},
            {"$unset": ["_members", "_requests", "_admins"]}])

    async def add_members(self, conversation_id: str, user_ids: list[str],
                          max_members: int) -> tuple[Record, list[str]] | None:
        wanted = {"$literal": list(dict.fromkeys(user_ids))}
        new = {"$filter": {"input": wanted, "cond": _not_in("$$this", "$participant_ids")}}
        fits = {"$lte": [{"$size": {"$setUnion": ["$participant_ids", wanted]}}, max_members]}
        before = await self._conversations.find_one_and_update(
            {"_id": conversation_id, "$expr": fits},
            [{"$set": {"_new": new}},
             {"$set": {"participant_ids": {"$concatArrays": ["$participant_ids", "$_new"]},
                       "requests": {"$concatArrays": [{"$ifNull": ["$requests", []]}, "$_new"]},
                       "former": _former_without("$_new")}},
             {"$unset": "_new"}], return_document=ReturnDocument.BEFORE)
        if before is None:
            if await self._conversations.find_one({"_id": conversation_id}, projection={"_id": 1}) is None:
                return None
            raise ValueError("too many members")
        added = [u for u in dict.fromkeys(user_ids) if u not in before["participant_ids"]]
        after = {**before, "participant_ids": [*before["participant_ids"], *added],
                 "requests": [*before.get("requests", []), *added],
                 "former": [f for f in before.get("former", []) if f["user_id"] not in added]}
        return records.conversation(after), added

    async def set_admin(self, conversation_id: str, user_id: str, admin: bool) -> Record | None:
        update = {"$addToSet": {"admins": user_id}} if admin else {"$pull": {"admins": user_id}}
        return await self._change(conversation_id, user_id, update)

    async def set_title(self, conversation_id: str, title: str | None) -> Record | None:
        return await self._change(conversation_id, None, {"$set": {"title": title}})

    async def set_message_ttl(self, conversation_id: str, ttl: int | None) -> Record | None:
        return await self._change(conversation_id, None, {"$set": {"message_ttl": ttl}})

    async def contact_ids(self, user_id: str) -> set[str]:
        contacts: set[str] = set()
        async for doc in self._conversations.find({"participant_ids": user_id, "requests": {"$ne": user_id}},
                                                  projection={"participant_ids": 1, "requests": 1}):
            pending = set(doc.get("requests", ()))
            contacts.update(m for m in doc["participant_ids"] if m not in pending)
        contacts.discard(user_id)
        async for doc in self._blocks.find({"$or": [{"blocker": user_id}, {"blocked": user_id}]}):
            contacts.discard(doc["blocked"] if doc["blocker"] == user_id else doc["blocker"])
        return contacts

    async def shares_conversation(self, user_id: str, other_id: str, accepted_by: str | None = None) -> bool:
        query: dict[str, Any] = {"participant_ids": {"$all": [user_id, other_id]}}
        if accepted_by is not None:
            query["requests"] = {"$ne": accepted_by}
        return await self._conversations.find_one(query, projection={"_id": 1}) is not None

    # -- blocks ----------------------------------------------------------------
    async def block_user(self, blocker_id: str, blocked_id: str) -> None:
        await self._blocks.update_one(
            {"_id": f"{blocker_id}:{blocked_id}"},
            {"$setOnInsert": {"blocker": blocker_id, "blocked": blocked_id, "blocked_at": utcnow()}}, upsert=True)

    async def unblock_user(self, blocker_id: str, blocked_id: str) -> None:
        await self._blocks.delete_one({"_id": f"{blocker_id}:{blocked_id}"})

    async def list_blocks(self, blocker_id: str) -> list[Record]:
        cursor = self._blocks.find({"blocker": blocker_id}, sort=[("blocked_at", DESCENDING), ("_id", DESCENDING)])
        return [{"user_id": d["blocked"], "blocked_at": d["blocked_at"]} async for d in cursor]

    async def blockers_of(self, user_id: str) -> set[str]:
        return {d["blocker"] async for d in self._blocks.find({"blocked": user_id}, projection={"blocker": 1})}

    async def senders_between(self, conversation_id: str, after_seq: int, up_to_seq: int) -> set[str]:
        cursor = await self._messages.aggregate([
            {"$match": {"conversation_id": conversation_id, "seq": {"$gt": after_seq, "$lte": up_to_seq}}},
            {"$group": {"_id": "$sender_id"}}])
        return {d["_id"] async for d in cursor if d["_id"]}
