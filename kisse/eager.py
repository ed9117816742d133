"""Start a coroutine now instead of on the next event-loop pass.

`run_eagerly(coro)` runs the coroutine at once, up to its first real
suspension. Most WebSocket requests never suspend with the in-memory backend,
so they finish right there without a Task or a loop pass, which the relay
benchmark measured at a fifth of the server's CPU per message. A coroutine
that does suspend (MongoDB, a socket write that must wait) carries on in a
Task, unchanged. Python 3.12's eager tasks do the same; Kisse runs on 3.11.
"""
from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any


def run_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """None if `coro` finished without suspending; else the Task running the rest.

    Both parts run in one context of their own, as a Task's would: context
    variables set before the first suspension (a request id, `pymongo.timeout`)
    are still there, and still the same, after it."""
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_carry_on(coro, waiting_on), context=context)


async def _carry_on(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    await _Resumed(coro, waiting_on)


class _Resumed:
    """Awaitable that hands what `coro` is waiting on to the running Task, then
    keeps driving `coro` exactly as a Task would: resume it with `send(None)`,
    or `throw()` what the Task throws in (cancellation)."""

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._coro, self._waiting_on = coro, waiting_on

    def __await__(self) -> Generator[Any, None, None]:
        waiting_on = self._waiting_on
        try:
            while True:
                try:
                    yield waiting_on  # a future (or None for a bare yield), as the coroutine yielded it
                except BaseException as error:  # thrown in by the Task: pass it on
                    waiting_on = self._coro.throw(error)
                else:
                    waiting_on = self._coro.send(None)
        except StopIteration:  # the coroutine returned
            return
