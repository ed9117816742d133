"""The storage backends the suites run against.

Memory always. MongoDB joins here (see tests/mongo_server.py) so every
contract, HTTP and WebSocket test runs on both.
"""
from __future__ import annotations

from storage.base import Storage
from storage.memory import MemoryStorage


def names() -> list[str]:
    return ["memory"]


async def open_storage(name: str) -> Storage:
    if name == "memory":
        store: Storage = MemoryStorage()
    else:  # pragma: no cover - only reached when a backend is listed but not wired
        raise ValueError(f"unknown test backend {name!r}")
    await store.start()
    return store
