"""Storage backends, chosen by URL scheme: `create_storage("memory://")`."""
from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from storage.base import Storage


def _memory(url: str) -> Storage:
    from storage.memory import MemoryStorage
    return MemoryStorage()


def _mongo(url: str) -> Storage:
    # Imported lazily so the memory backend needs no MongoDB driver at all.
    from storage.mongo import MongoStorage
    return MongoStorage(url)


BACKENDS: dict[str, Callable[[str], Storage]] = {
    "memory": _memory,
    "mongodb": _mongo,
    "mongodb+srv": _mongo,
}


def create_storage(url: str) -> Storage:
    """Build the backend for `url`; raise ValueError for an unknown scheme."""
    scheme = urlsplit(url).scheme
    factory = BACKENDS.get(scheme)
    if factory is None:
        raise ValueError(f"unknown storage scheme {scheme!r} in {url!r}; "
                         f"known: {', '.join(sorted(BACKENDS))}")
    return factory(url)
