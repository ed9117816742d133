"""Every local WebSocket's heartbeat from one timer, not a task per connection.

A task each (its coroutine frame, the sleep's future and timer handle, and
asyncio's weak set of tasks) cost about 3 KB per idle connection, measured
with tracemalloc: an eighth of what an idle connection costs in all.

Connections go round-robin into `SLOTS` slots as they open, and the timer
visits one slot every `interval / SLOTS` seconds: each connection is visited
once per interval, and the pings of a burst of connections leave spread over
the interval instead of all at once.
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


class Beating(Protocol):
    def beat(self, late: bool) -> None:
        """Judge the peer on the interval just ended (unless `late`), then ping it."""


class Heartbeat:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._slots: list[dict[Beating, None]] = [{} for _ in range(SLOTS)]
        self._visited: list[float | None] = [None] * SLOTS
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

    async def visit(self) -> None:
        """Beat the next slot's connections (run every `interval / SLOTS` s)."""
        slot, self._next = self._next, (self._next + 1) % SLOTS
        now = asyncio.get_running_loop().time()
        previous, self._visited[slot] = self._visited[slot], now
        late = previous is not None and now - previous >= self.interval * LATE_WAKEUP
        for connection in list(self._slots[slot]):  # a beat may close one, which discards it
            try:
                connection.beat(late)
            except Exception:  # a bug in one connection's beat must not skip the others
                log.exception("heartbeat failed for a connection")
