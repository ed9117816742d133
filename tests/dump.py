"""Everything a storage backend holds, as bytes, for privacy checks.

`await dump(storage)` returns every leaf value the backend holds: strings as
UTF-8, bytes as they are, numbers (and booleans, dates, ids) as their `str`.
A test then searches the list (or the leaves joined) for what must never be
there: a plaintext, a private key.

* `MemoryStorage`: its whole internal state, walked recursively (dict keys
  and values, lists, tuples, sets, nested records). A list of byte strings
  (a blob's chunks) is also one leaf whole, so nothing hides across chunks.
* `MongoStorage`: every document of every collection of its database, read
  through the async PyMongo client the storage holds. GridFS chunk
  collections (`<bucket>.chunks`, e.g. `encrypted_content.chunks`) are
  reassembled: each file's data is one leaf, so a value straddling two chunks
  is still found; their other fields are leaves as usual.

The walk is strict on purpose: a value of a type it does not know raises
`TypeError` rather than being skipped, so a backend that starts keeping data in
a new kind of object makes the privacy tests fail loudly until `dump` learns
to look inside it (add it to `_leaf` or `_children`).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import decimal
import enum
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

import bson
from pymongo.asynchronous.database import AsyncDatabase

from storage.base import Storage
from storage.memory import MemoryStorage

# Objects that hold no data of their own (synchronisation primitives).
_NO_DATA = (asyncio.Lock, asyncio.Event, asyncio.Condition, asyncio.Semaphore,
            type(threading.Lock()), type(threading.RLock()))


def _leaf(value: Any) -> bytes | None:
    """The bytes of a leaf value; None when `value` is not a leaf."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):  # also bson.Code
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, (bytes, bytearray, memoryview)):  # also bson.Binary
        return bytes(value)
    if isinstance(value, (bool, int, float, decimal.Decimal, datetime.date, datetime.time,
                          datetime.timedelta, uuid.UUID, bson.ObjectId, bson.Decimal128,
                          bson.Timestamp, bson.Int64)):
        return str(value).encode()
    if isinstance(value, bson.Regex):
        return value.pattern if isinstance(value.pattern, bytes) else value.pattern.encode()
    return None


def _children(value: Any) -> Iterator[Any] | None:
    """The values inside a container or record object; None when `value` is neither."""
    if isinstance(value, dict):
        return (item for pair in value.items() for item in pair)  # keys hold data too
    if isinstance(value, (list, tuple, set, frozenset, deque)):
        return iter(value)
    if isinstance(value, bson.DBRef):
        return iter((value.collection, value.id, value.database, value.as_doc()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (getattr(value, f.name) for f in dataclasses.fields(value))
    if type(value).__module__.split(".")[0] == "storage":  # the backend's own helper objects
        state = dict(getattr(value, "__dict__", {}))
        for cls in type(value).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(value, slot):
                    state[slot] = getattr(value, slot)
        return iter(state.values())
    return None


def leaves(value: Any) -> list[bytes]:
    """Every leaf under `value`, depth first (each container visited once)."""
    out: list[bytes] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, (bson.MinKey, bson.MaxKey) + _NO_DATA):
            continue
        leaf = _leaf(item)
        if leaf is not None:
            out.append(leaf)
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        children = _children(item)
        if children is None:
            raise TypeError(f"dump cannot look inside a {type(item).__module__}.{type(item).__qualname__}: "
                            "teach tests/dump.py about it")
        children = list(children)
        if isinstance(item, (list, tuple)) and len(children) > 1 and all(
                isinstance(c, (bytes, bytearray, memoryview)) for c in children):
            out.append(b"".join(children))  # chunks of one value (memory blobs): whole, too
        stack.extend(reversed(children))
    return out


async def dump_database(database: AsyncDatabase) -> list[bytes]:
    """Every leaf of every document in every collection; GridFS files reassembled."""
    out: list[bytes] = []
    for name in sorted(await database.list_collection_names()):
        collection = database[name]
        if name.endswith(".chunks"):
            files: dict[Any, list[tuple[int, bytes]]] = {}
            async for chunk in collection.find({}):
                data = chunk.pop("data", b"")
                files.setdefault(chunk.get("files_id"), []).append((chunk.get("n", 0), bytes(data)))
                out.extend(leaves(chunk))
            out.extend(b"".join(data for _, data in sorted(pieces, key=lambda p: p[0]))
                       for pieces in files.values())
            continue
        async for document in collection.find({}):
            out.extend(leaves(document))
    return out


def encodings(secret: bytes) -> list[bytes]:
    """How a server could store these bytes: raw, base64 (standard and URL-safe, with or
    without padding: the unpadded text is inside the padded one) and hex."""
    return [secret,
            base64.b64encode(secret).rstrip(b"="),
            base64.urlsafe_b64encode(secret).rstrip(b"="),
            secret.hex().encode(), secret.hex().upper().encode()]


def holds(haystack: bytes, secret: bytes) -> bool:
    """Whether the joined dump holds `secret` in any of its `encodings`."""
    return any(form in haystack for form in encodings(secret))


async def dump(storage: Storage) -> list[bytes]:
    """Every leaf value `storage` holds (see the module docstring)."""
    if isinstance(storage, MemoryStorage):
        return leaves(vars(storage))
    database = getattr(storage, "db", None)  # MongoStorage: the database its AsyncMongoClient serves
    if isinstance(database, AsyncDatabase):
        return await dump_database(database)
    raise TypeError(f"dump does not know the {type(storage).__qualname__} backend")
