"""Presence: online, away, busy, offline (invisible), and last_seen.

A user's *chosen* status is stored (it survives reconnects); whether they are
*connected* is known to this process's hub. What others see:

- connected (or disconnected for less than the grace period) → the chosen
  status, except "offline" (invisible), which shows as offline;
- otherwise → offline, with `last_seen`.

Only people who share a conversation with a user see their presence.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

from kisse.errors import NotFound
from kisse.runtime import Runtime
from kisse.views import presence_view
from storage.base import utcnow


class PresenceTracker:
    """Turns hub connect/disconnect into presence changes, with a grace period.

    In a cluster (kisse/redis_bus.py) a user is present while any node has them
    present: a node announces "online" only if no other node had them, and
    "offline" at the end of its grace only if no other node has them now, so a
    reconnect to another node does not flap. A dead node's users go offline
    when a live node reaps it (`on_user_gone`)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        rt.hub.on_first_connection.append(self._connected)
        rt.hub.on_last_disconnection.append(self._disconnected)
        rt.bus.on_user_gone.append(self._gone_elsewhere)

    def is_present(self, user_id: str) -> bool:
        """Present on this process: connected, or within the grace of their last connection."""
        return self.rt.hub.is_connected(user_id) or user_id in self._lingering

    async def present_among(self, user_ids: list[str]) -> set[str]:
        """Which of these users are present on any process."""
        here = {u for u in user_ids if self.is_present(u)}
        rest = [u for u in user_ids if u not in here]
        return here | (await self.rt.bus.present(rest) if rest else set())

    def _connected(self, user_id: str) -> None:
        timer = self._lingering.pop(user_id, None)
        if timer is not None:
            timer.cancel()  # back within the grace period: nobody saw them leave
            return
        self.rt.tasks.spawn(self._arrive(user_id), "presence announce")

    def _disconnected(self, user_id: str) -> None:
        loop = asyncio.get_running_loop()
        self._lingering[user_id] = loop.call_later(
            self.rt.settings.presence_grace, self._grace_over, user_id)

    def _grace_over(self, user_id: str) -> None:
        if self._lingering.pop(user_id, None) is not None and not self.rt.hub.is_connected(user_id):
            self.rt.tasks.spawn(self._depart(user_id), "presence announce")

    async def _arrive(self, user_id: str) -> None:
        elsewhere = await self.rt.bus.present_elsewhere(user_id)
        await self.rt.bus.joined(user_id)
        if not elsewhere:
            await self._announce(user_id)

    async def _depart(self, user_id: str) -> None:
        await self.rt.bus.left(user_id)
        if not self.is_present(user_id) and not await self.rt.bus.present_elsewhere(user_id):
            await self._announce(user_id)

    def _gone_elsewhere(self, user_id: str) -> None:
        if not self.is_present(user_id):
            self.rt.tasks.spawn(self._announce(user_id), "presence announce")

    async def _announce(self, user_id: str) -> None:
        """Stamp last_seen and tell contacts the user's presence as it now shows.
        Always run as a background task (rt.tasks), which logs a failure."""
        record = (await self.rt.storage.get_presences([user_id])).get(user_id)
        if record is not None and record["status"] == "offline":
            return  # contacts already see an invisible user as offline
        record = await self.rt.storage.set_presence(user_id, last_seen=coarse(self.rt, utcnow()))
        await publish(self.rt, user_id, await effective(self.rt, user_id, record))

    def close(self) -> None:
        for timer in self._lingering.values():
            timer.cancel()
        self._lingering.clear()


async def effective(rt: Runtime, user_id: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The presence others see for `user_id`."""
    if record is None:
        record = (await rt.storage.get_presences([user_id])).get(user_id)
    return shown(record, user_id, bool(await rt.presence.present_among([user_id])))


def coarse(rt: Runtime, moment: datetime) -> datetime:
    """`moment` rounded down to KISSE_LAST_SEEN_PRECISION: what is stored is all anyone can learn."""
    precision = rt.settings.last_seen_precision
    return datetime.fromtimestamp(moment.timestamp() // precision * precision, timezone.utc) if precision > 1 \
        else moment


def shown(record: dict[str, Any] | None, user_id: str, present: bool) -> dict[str, Any]:
    """The presence others see for `user_id`, given its stored record (None: never set)
    and whether they are present on some process; no last_seen for a user who hides it."""
    chosen = record["status"] if record else "online"
    last_seen = record["last_seen"] if record and record.get("show_last_seen", True) else None
    return presence_view(user_id, chosen if present else "offline", last_seen)


async def publish(rt: Runtime, user_id: str, view: dict[str, Any]) -> None:
    """Tell the user's contacts (and the user's own devices) about a presence change."""
    contacts = await rt.storage.contact_ids(user_id)
    rt.bus.send([user_id, *contacts], "presence", view)


async def set_status(rt: Runtime, user_id: str, status: str | None,
                     show_last_seen: bool | None = None) -> dict[str, Any]:
    """Store the chosen status and/or whether others see last_seen; contacts hear a change that shows."""
    before = await effective(rt, user_id)
    record = await rt.storage.set_presence(user_id, status=status, show_last_seen=show_last_seen)
    view = await effective(rt, user_id, record)
    if view != before:
        await publish(rt, user_id, view)
    return {**view, "chosen_status": record["status"], "show_last_seen": record["show_last_seen"]}


async def get_for(rt: Runtime, viewer_id: str, user_id: str) -> dict[str, Any]:
    """A user's presence, for the user themself or someone sharing a conversation."""
    if viewer_id != user_id and viewer_id not in await rt.storage.contact_ids(user_id):
        raise NotFound("no such user", code="user_not_found")
    return await effective(rt, user_id)
