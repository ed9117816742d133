"""Background work owned by one app: every task is referenced until it ends, and
shutdown cancels and awaits what is still running before storage closes."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("kisse.tasks")
CANCEL_AGAIN_AFTER = 0.5  # seconds


class Background:
    """The app's background tasks: one-off (`spawn`) and periodic (`every`)."""

    def __init__(self, quiet: tuple[type[BaseException], ...] = ()) -> None:
        """`quiet`: failures logged in one line, without a traceback: the storage being
        unavailable, which /readyz and the 503s tell already (in a storage stall a
        traceback per failed task made megabytes of log)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._quiet = quiet

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """Run `coro` in the background; a failure is logged, never lost. None once closed."""
        if self._closed:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(self._logged(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def every(self, interval: float, step: Callable[[], Awaitable[Any]], name: str,
              first_after: float = 0.0) -> asyncio.Task[Any] | None:
        """Run `step` now (or after `first_after` s), then every `interval` s until shutdown."""
        async def repeat() -> None:
            await asyncio.sleep(first_after)
            while not self._closed:
                try:
                    await step()
                except Exception as error:  # e.g. storage down: try again next round
                    if self._closed:
                        return  # cancelled, though the cancellation came back as an error
                    self._failed(name, error, logging.WARNING)
                await asyncio.sleep(interval)
        return self.spawn(repeat(), name)

    async def close(self) -> None:
        """Cancel what is still running and wait for it to finish.

        A cancellation can fail to take effect: a task cancelled inside a PyMongo
        call was seen still pending long after (and one wait forever hung the
        test suite now and then), so cancel again until everything is done."""
        self._closed = True
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_AFTER)

    async def _logged(self, coro: Coroutine[Any, Any, Any], name: str) -> Any:
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._failed(name, error, logging.ERROR)
            return None

    def _failed(self, name: str, error: Exception, level: int) -> None:
        if isinstance(error, self._quiet):
            log.warning("%s failed: storage unavailable (%s)", name, type(error).__name__)
        else:
            log.log(level, "%s failed", name, exc_info=error)
