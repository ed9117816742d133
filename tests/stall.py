"""A storage that can be made to stall, as MongoDB does during an election or on a slow disk."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any

from storage.base import Storage


class StallableStorage:
    """Wraps a `Storage`: while `stall()` holds, every call waits before it reaches the
    backend; `fail()` makes chosen calls raise instead."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._only: set[str] | None = None
        self.waiting = 0  # calls held right now
        self._failing: tuple[BaseException, set[str]] | None = None

    def stall(self, only: set[str] | None = None) -> None:
        """Hold every call from now on, or only calls to the methods named in `only`."""
        self._only = only
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def fail(self, error: BaseException | None, only: set[str]) -> None:
        """Raise `error` from the calls to the methods named in `only` (None: stop failing)."""
        self._failing = (error, only) if error is not None else None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attribute) or name in ("close", "start"):
            return attribute

        async def held(*args: Any, **kwargs: Any) -> Any:
            if self._failing is not None and name in self._failing[1]:
                raise self._failing[0]
            if not self._flowing.is_set() and (self._only is None or name in self._only):
                self.waiting += 1
                try:
                    await self._flowing.wait()
                finally:
                    self.waiting -= 1
            return await attribute(*args, **kwargs)
        return held
