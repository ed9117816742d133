"""The contact boundary, one rule for presence, last_seen, typing, receipts and calls.

Two users are *contacts* when they share a conversation that both have
accepted, and neither has blocked the other (`Storage.contact_ids`). Only
contacts see each other's presence and last_seen, and only contacts can call
each other. Inside one conversation, typing and receipts flow between members
who have both accepted *it* and do not block each other (`audience`).
Messages are the exception that makes requests work: a request's recipient
gets them (not those of a sender they blocked). docs/SECURITY.md states the
same rule and what a stranger can still learn.
"""
from __future__ import annotations

from kisse.bus import BLOCKS_CHANGED, Event
from kisse.errors import BadRequest, Forbidden, NotFound
from kisse.members import Membership
from kisse.runtime import Runtime

CACHE_SIZE = 100_000  # users
NOBODY: frozenset[str] = frozenset()


class Blocks:
    """Who blocked whom, kept in process: `blocked(u)` (by u) and `blockers(u)` (of u).
    Every block and unblock goes through `block`/`unblock` below, which tell every
    process (`blocks.changed` on the bus) to forget both users."""

    def __init__(self, rt: Runtime, size: int = CACHE_SIZE) -> None:
        self._rt = rt
        self._size = size
        self._blocked: dict[str, frozenset[str]] = {}
        self._blockers: dict[str, frozenset[str]] = {}
        self._version = 0  # counts forgets: a read under way during one is used, not kept

    async def blocked(self, user_id: str) -> frozenset[str]:
        found = self._blocked.get(user_id)
        if found is None:
            version = self._version
            found = frozenset(b["user_id"] for b in await self._rt.storage.list_blocks(user_id))
            if version == self._version:
                self._keep(self._blocked, user_id, found)
        return found

    async def blockers(self, user_id: str) -> frozenset[str]:
        found = self._blockers.get(user_id)
        if found is None:
            version = self._version
            found = frozenset(await self._rt.storage.blockers_of(user_id))
            if version == self._version:
                self._keep(self._blockers, user_id, found)
        return found

    async def both(self, user_id: str) -> tuple[frozenset[str], frozenset[str]]:
        """`(blocked, blockers)` of the user, without awaiting when both are cached (the hot path)."""
        blocked, blockers = self._blocked.get(user_id), self._blockers.get(user_id)
        if blocked is None:
            blocked = await self.blocked(user_id)
        if blockers is None:
            blockers = await self.blockers(user_id)
        return blocked, blockers

    async def either_way(self, user_id: str) -> frozenset[str]:
        """Everyone this user blocked or was blocked by."""
        blocked, blockers = await self.both(user_id)
        return blocked | blockers

    def _keep(self, cache: dict[str, frozenset[str]], user_id: str, found: frozenset[str]) -> None:
        if len(cache) >= self._size:
            del cache[next(iter(cache))]
        # Most users block nobody: one shared empty set instead of 216 bytes each.
        cache[user_id] = found or NOBODY

    def forget(self, *user_ids: str) -> None:
        self._version += 1
        for user_id in user_ids:
            self._blocked.pop(user_id, None)
            self._blockers.pop(user_id, None)

    def on_event(self, event: Event) -> None:
        """A bus subscriber: some process changed who blocks whom."""
        if event.type == BLOCKS_CHANGED:
            self.forget(*event.data["user_ids"])


async def audience(rt: Runtime, membership: Membership, actor_id: str) -> list[str]:
    """The members who get `actor_id`'s typing and receipts in this conversation (the
    actor's own devices aside): nobody while the actor has not accepted it; else
    the members who have, less anyone the actor blocked or was blocked by."""
    if not membership.accepted(actor_id):
        return []
    blocked, blockers = await rt.blocks.both(actor_id)
    requests = membership.requests
    return [m for m in membership.ids
            if m != actor_id and m not in requests and m not in blocked and m not in blockers]


async def block(rt: Runtime, blocker_id: str, user_id: str) -> None:
    if user_id == blocker_id:
        raise BadRequest("you cannot block yourself", code="cannot_block_self")
    user = await rt.storage.get_user(user_id)
    if user is None or user.get("deleted"):
        raise NotFound("no such user", code="user_not_found")
    await rt.storage.block_user(blocker_id, user_id)
    rt.bus.changed(BLOCKS_CHANGED, {"user_ids": [blocker_id, user_id]})


async def unblock(rt: Runtime, blocker_id: str, user_id: str) -> None:
    await rt.storage.unblock_user(blocker_id, user_id)
    rt.bus.changed(BLOCKS_CHANGED, {"user_ids": [blocker_id, user_id]})


async def list_blocks(rt: Runtime, blocker_id: str) -> dict[str, list[dict[str, str]]]:
    from kisse.views import iso
    blocks = await rt.storage.list_blocks(blocker_id)
    users = {u["id"]: u for u in await rt.storage.get_users([b["user_id"] for b in blocks])}
    return {"blocks": [{"user_id": b["user_id"], "username": users[b["user_id"]]["username"],
                        "display_name": users[b["user_id"]]["display_name"], "blocked_at": iso(b["blocked_at"])}
                       for b in blocks if b["user_id"] in users]}


def not_a_contact() -> Forbidden:
    return Forbidden("you can call people who share an accepted conversation with you", code="not_a_contact")
