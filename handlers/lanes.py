"""The requests of one WebSocket, in lanes.

Requests in one lane are handled one at a time, in the order they arrived;
lanes do not wait for each other. A lane is what ordering needs: one
conversation (its sends and typing), one message (its receipts), one call (its
answer and signalling), or one request type (sync, presence.set, call.start).
`ping` waits for nothing. So a send stuck on storage holds back the later
sends of its conversation, and nothing else.

At most `limit` requests wait or run per connection; with that many, the
connection stops reading (TCP backpressure: the client cannot queue unbounded
work) until one lane has finished one.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from kisse.eager import run_eagerly

Request = tuple[str, Any, dict[str, Any]]  # (type, id, data)
Runner = Callable[[Request], Coroutine[Any, Any, None]]


def lane_of(kind: str, data: dict[str, Any]) -> str | None:
    """The lane a request waits in; None for one that waits for nothing."""
    if kind == "ping":
        return None
    if "conversation_id" in data and kind in ("message.send", "typing.start", "typing.stop"):
        return "conversation:" + data["conversation_id"]
    if "message_id" in data:
        return "message:" + data["message_id"]
    if "call_id" in data:
        return "call:" + data["call_id"]
    return kind


class Lanes:
    """Per-lane queues of one connection, and the count that drives backpressure."""

    __slots__ = ("_run", "_limit", "_queues", "_active", "_room", "_idle", "_closed")

    def __init__(self, run: Runner, limit: int) -> None:
        self._run, self._limit = run, limit
        self._queues: dict[str, deque[Request]] = {}  # busy lanes and what waits in them
        self._active = 0  # requests running or waiting
        self._room: asyncio.Future[None] | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False

    def submit(self, lane: str | None, request: Request) -> asyncio.Future[None] | None:
        """Handle `request` now, or after those before it in its lane. Returns a
        future to wait on before reading more when the connection is full."""
        if self._closed:
            return None
        if lane is None:
            run_eagerly(self._run(request))
            return None
        self._active += 1
        queue = self._queues.get(lane)
        if queue is not None:
            queue.append(request)
        else:
            self._queues[lane] = deque()
            # Handled right here unless it has to wait (kisse/eager.py).
            run_eagerly(self._drain(lane, request))
        if self._active < self._limit:
            return None
        if self._room is None:
            self._room = asyncio.get_running_loop().create_future()
        return self._room

    @property
    def active(self) -> int:
        """Requests taken and not yet answered."""
        return self._active

    def close(self) -> None:
        """Drop what has not started: requests die with their connection."""
        self._closed = True
        for queue in self._queues.values():
            self._active -= len(queue)
            queue.clear()
        self._wake()

    async def idle(self) -> None:
        """Wait until no request runs or waits."""
        while self._active:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()

    async def _drain(self, lane: str, request: Request) -> None:
        queue = self._queues[lane]
        try:
            while True:
                await self._run(request)
                self._active -= 1
                self._wake()
                if not queue:
                    return
                request = queue.popleft()
        finally:
            del self._queues[lane]

    def _wake(self) -> None:
        if self._room is not None and self._active < self._limit:
            room, self._room = self._room, None
            room.set_result(None)
        if self._idle is not None and not self._active:
            idle, self._idle = self._idle, None
            idle.set()
