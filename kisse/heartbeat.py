"""Every local WebSocket's heartbeat from one timer, not a task per connection.

A task each (its coroutine frame, the sleep's future and timer handle, and
asyncio's weak set of tasks) cost about 3 KB per idle connection, measured
with tracemalloc: an eighth of what an idle connection costs in all.

Connections go round-robin into `SLOTS` slots as they open, and the timer
visits one slot every `interval / SLOTS` seconds, on a fixed schedule (the
visits' own time does not stretch it): each connection is visited once per
interval, and the pings of a burst of connections leave spread over the
interval instead of all at once. A visit gives the loop back every
`YIELD_EVERY` connections.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("kisse.ws")

SLOTS = 8
# A visit this many intervals after the slot's last one means the loop was too
# busy to read: that interval gives no verdict on the peers.
LATE_WAKEUP = 1.5
YIELD_EVERY = 500


class Beating(Protocol):
    def beat(self, late: bool) -> None:
        """Judge the peer on the interval just ended (unless `late`), then ping it."""


class Heartbeat:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._slots: list[dict[Beating, None]] = [{} for _ in range(SLOTS)]
        self._opened = 0
        self._next = 0

    def add(self, connection: Beating) -> int:
        """Beat `connection` from now on; returns its slot, for `discard`."""
        slot = self._opened % SLOTS
        self._opened += 1
        self._slots[slot][connection] = None
        return slot

    def discard(self, connection: Beating, slot: int) -> None:
        self._slots[slot].pop(connection, None)

    async def run(self) -> None:
        """Visit the slots in turn until cancelled (kisse/app.py starts it)."""
        loop = asyncio.get_running_loop()
        step = self.interval / SLOTS
        due = loop.time() + step
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            # Woken half an interval late: the loop was too busy to read, so the slot's
            # last interval was not all reading time.
            late = loop.time() - due >= self.interval * (LATE_WAKEUP - 1)
            slot, self._next = self._next, (self._next + 1) % SLOTS
            await self._visit(slot, late)
            due += step
            if loop.time() > due + self.interval:  # stalled for long: no burst of visits to catch up
                due = loop.time() + step

    async def _visit(self, slot: int, late: bool) -> None:
        connections = self._slots[slot]
        for n, connection in enumerate(list(connections), 1):
            if connection not in connections:
                continue  # closed while the loop was given back
            try:
                connection.beat(late)
            except Exception:  # a bug in one connection's beat must not skip the others
                log.exception("heartbeat failed for a connection")
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
