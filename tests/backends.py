"""The storage backends the suites run against.

* `memory` - always.
* `mongo` - the real PyMongo async driver against mongoeco's MongoDB wire
  server (see tests/mongo_server.py). Skipped, with the reason shown, when no
  Python >= 3.13 is around to run it; with `CI=true` that is a failure instead.
* `mongo-real` - a real MongoDB at `KISSE_TEST_MONGODB_URI` (e.g.
  `mongodb://localhost:27017/?replicaSet=rs0`); skipped when it is not set.

Each Mongo test gets a fresh database, `kisse_test_<hex>`, dropped at close.
"""
from __future__ import annotations

import os
import secrets
from urllib.parse import urlsplit, urlunsplit

import pytest

from storage.base import Storage
from storage.memory import MemoryStorage

REAL_URI_ENV = "KISSE_TEST_MONGODB_URI"
# Short timeouts: a test against a dead server fails in seconds, not minutes.
TEST_URI_OPTIONS = {"serverSelectionTimeoutMS": "2000", "connectTimeoutMS": "2000", "timeoutMS": "10000"}


def names() -> list[str]:
    return ["memory", "mongo", "mongo-real"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def mongo_uri(name: str, database: str | None = None) -> str:
    """A URI for a fresh database on the `mongo` or `mongo-real` server; skips
    (fails under CI for `mongo`) when that server is not available."""
    database = database or f"kisse_test_{secrets.token_hex(6)}"
    if name == "mongo":
        from tests import mongo_server
        reason = mongo_server.unavailable_reason()
        if reason:
            if in_ci():
                pytest.fail(f"CI=true but the Mongo suite cannot run: {reason}", pytrace=False)
            pytest.skip(reason)
        return mongo_server.shared_server().uri(database, **TEST_URI_OPTIONS)
    if name == "mongo-real":
        base = os.environ.get(REAL_URI_ENV)
        if not base:
            pytest.skip(f"{REAL_URI_ENV} is not set: no real MongoDB to test against")
        parts = urlsplit(base)
        return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))
    raise ValueError(f"not a Mongo test backend: {name!r}")


def _test_mongo_storage_class():
    from storage.mongo import MongoStorage

    class TestMongoStorage(MongoStorage):
        """MongoStorage that drops its per-test database when closed."""

        async def close(self) -> None:
            try:
                await self._client.drop_database(self.db.name)
            except Exception:  # server gone (some tests stop it): nothing to drop
                pass
            await super().close()

    return TestMongoStorage


async def open_storage(name: str) -> Storage:
    if name == "memory":
        store: Storage = MemoryStorage()
    elif name in ("mongo", "mongo-real"):
        store = _test_mongo_storage_class()(mongo_uri(name))
    else:  # pragma: no cover - only reached when a backend is listed but not wired
        raise ValueError(f"unknown test backend {name!r}")
    await store.start()
    return store
