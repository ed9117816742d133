"""The in-memory backend: the default for local use and tests.

Every method runs to completion without awaiting, so on one event loop each
call is atomic; that is what makes seq allocation, idempotent sends and call
compare-and-set safe under concurrent coroutines without locks. Records are
copied on the way in and out so callers never alias the backend's state.
"""
from __future__ import annotations

import bisect
import hashlib
import heapq
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta
from typing import Any

from storage import faults
from storage.base import (
    FINAL_CALL_STATUSES, LIVE_CALL_STATUSES, MAX_DEVICE_ID, BlobNotFound, BlobTooLarge, BlobWriter, PrekeyIdTaken,
    Record, ReceiptKind, Storage, TooManyDevices, TooManyPrekeys, UsernameTaken, new_id, utcnow,
)

# Blobs are kept as a list of chunks of this size, like GridFS, so a range
# read touches only the chunks it needs.
BLOB_CHUNK_SIZE = 255 * 1024


def _copy(record: Record) -> Record:
    """Copy a record and its nested dicts (recursively) and lists (shallowly: they hold ids)."""
    out = record.copy()
    for key, value in record.items():
        kind = type(value)  # exact types: records hold plain dicts and lists (a hot path)
        if kind is dict:
            out[key] = _copy(value)
        elif kind is list:
            out[key] = value.copy()
    return out


def _public_user(user: Record) -> Record:
    return {k: user[k] for k in ("id", "username", "display_name", "created_at", "deleted")}


DEVICE_FIELDS = ("user_id", "device_id", "name", "created_at", "last_seen_at", "session_id", "rotated_at")
SPENT_KEPT = 20  # spent refresh hashes remembered per device, to tell a reuse from garbage
DELETED_NAME = "Deleted account"


def _public_device(device: Record) -> Record:
    return {k: device[k] for k in DEVICE_FIELDS}


class MemoryBlobWriter(BlobWriter):
    def __init__(self, store: "MemoryStorage", max_size: int) -> None:
        self.blob_id = new_id()
        self._store = store
        self._max_size = max_size
        self._chunks: list[bytes] = []
        self._pending = bytearray()
        self._size = 0
        self._sha = hashlib.sha256()

    async def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_size:
            await self.abort()
            raise BlobTooLarge(f"blob exceeds {self._max_size} bytes")
        self._sha.update(chunk)
        self._store.stats["blob_writes"] += 1
        self._store.stats["largest_blob_write"] = max(self._store.stats["largest_blob_write"], len(chunk))
        self._pending += chunk
        while len(self._pending) >= BLOB_CHUNK_SIZE:
            self._chunks.append(bytes(self._pending[:BLOB_CHUNK_SIZE]))
            del self._pending[:BLOB_CHUNK_SIZE]

    async def finish(self) -> tuple[int, str]:
        if self._pending:
            self._chunks.append(bytes(self._pending))
            self._pending.clear()
        self._store._blobs[self.blob_id] = (self._chunks, self._size)
        return self._size, self._sha.hexdigest()

    async def abort(self) -> None:
        self._chunks, self._pending = [], bytearray()
        self._store._blobs.pop(self.blob_id, None)


class MemoryStorage(Storage):
    """Everything in dicts, gone when the process exits."""

    def __init__(self) -> None:
        self._users: dict[str, Record] = {}
        self._user_by_name: dict[str, str] = {}          # lower-cased username -> id
        self._sorted_names: list[str] = []               # lower-cased usernames, sorted
        self._conversations: dict[str, Record] = {}
        self._direct: dict[tuple[str, str], str] = {}    # sorted pair -> conversation id
        self._member_of: dict[str, set[str]] = {}        # user id -> conversation ids
        self._messages: dict[str, Record] = {}
        self._by_conversation: dict[str, list[Record]] = {}  # index = seq - 1
        self._by_client_id: dict[tuple[str, str], str] = {}
        self._receipts: dict[str, dict[str, Record]] = {}
        self._blocks: dict[str, dict[str, datetime]] = {}  # blocker -> blocked -> when
        self._blockers: dict[str, set[str]] = {}          # blocked -> blockers
        self._blobs: dict[str, tuple[list[bytes], int]] = {}
        self._presence: dict[str, Record] = {}
        self._calls: dict[str, Record] = {}
        self._devices: dict[str, dict[int, Record]] = {}  # user id -> device id -> device (with its session)
        self._sessions: dict[str, Record] = {}           # session id -> device
        self._by_refresh: dict[str, Record] = {}         # live refresh hash -> device
        self._prekeys: dict[str, dict[str, dict[int, Record]]] = {}  # session id -> kind -> key id -> key
        # The same pools' key ids as heaps, so a claim takes the lowest in O(log n).
        self._prekey_ids: dict[str, dict[str, list[int]]] = {}
        self._expiring: list[tuple[datetime, str]] = []  # a heap of (expires_at, message id)
        self._leases: dict[str, tuple[str, datetime]] = {}  # name -> (owner, until)
        self.stats: dict[str, int] = {"blob_writes": 0, "largest_blob_write": 0}

    # -- lifecycle -----------------------------------------------------------
    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- users ---------------------------------------------------------------
    async def create_user(self, username: str, password_hash: str, display_name: str) -> Record:
        key = username.lower()
        if key in self._user_by_name:
            raise UsernameTaken(username)
        user = {"id": new_id(), "username": username, "display_name": display_name,
                "created_at": utcnow(), "password_hash": password_hash, "deleted": False}
        self._users[user["id"]] = user
        self._user_by_name[key] = user["id"]
        bisect.insort(self._sorted_names, key)
        return _public_user(user)

    async def get_user(self, user_id: str) -> Record | None:
        user = self._users.get(user_id)
        return _public_user(user) if user else None

    async def get_users(self, user_ids: list[str]) -> list[Record]:
        return [_public_user(self._users[i]) for i in dict.fromkeys(user_ids) if i in self._users]

    async def get_credentials(self, username: str) -> tuple[Record, str] | None:
        user_id = self._user_by_name.get(username.lower())
        if user_id is None or self._users[user_id]["deleted"]:
            return None
        user = self._users[user_id]
        return _public_user(user), user["password_hash"]

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        self._users[user_id]["password_hash"] = password_hash

    async def delete_user(self, user_id: str) -> None:
        user = self._users.get(user_id)
        if user is None or user["deleted"]:
            return
        user.update(deleted=True, password_hash=None, display_name=DELETED_NAME)
        self._sorted_names.remove(user["username"].lower())  # out of searches; the name stays taken
        await self.revoke_devices(user_id)
        self._presence.pop(user_id, None)
        for message in self._messages.values():
            if message["sender_id"] == user_id and message["tombstone"] is None:
                if message["blob_id"]:
                    self._blobs.pop(message["blob_id"], None)
                message.update(ciphertext=None, content=None, blob_id=None, tombstone="sender_deleted")
        for conversation in self._conversations.values():
            last = conversation["last_message"]
            if last and last["sender_id"] == user_id:
                conversation["last_message"] = _metadata(self._by_conversation[conversation["id"]][last["seq"] - 1])

    # -- devices and their sessions ------------------------------------------------
    async def create_device(self, user_id: str, name: str, refresh_hash: str, refresh_expires_at: datetime,
                            max_devices: int) -> Record:
        live = self._devices.setdefault(user_id, {})
        now = utcnow()
        for dead in [d for d in live.values() if d["refresh_expires_at"] <= now]:
            await self.revoke_devices(user_id, device_id=dead["device_id"])  # no slot for a session long gone
        if len(live) >= max_devices:
            raise TooManyDevices([_public_device(d) for d in sorted(live.values(), key=lambda d: d["device_id"])])
        device_id = next(n for n in range(1, MAX_DEVICE_ID + 1) if n not in live)
        device = {"user_id": user_id, "device_id": device_id, "name": name, "created_at": now,
                  "last_seen_at": now, "session_id": new_id(), "rotated_at": None,
                  "refresh_hash": refresh_hash, "refresh_expires_at": refresh_expires_at, "spent": []}
        live[device_id] = device
        self._sessions[device["session_id"]] = device
        self._by_refresh[refresh_hash] = device
        return _public_device(device)

    async def list_devices(self, user_id: str) -> list[Record]:
        return [_public_device(d) for _, d in sorted(self._devices.get(user_id, {}).items())]

    async def get_session(self, session_id: str) -> Record | None:
        device = self._sessions.get(session_id)
        return _public_device(device) if device else None

    async def session_of_refresh(self, refresh_hash: str) -> Record | None:
        device = self._by_refresh.get(refresh_hash)
        return _public_device(device) if device else None

    async def touch_device(self, session_id: str, at: datetime) -> None:
        device = self._sessions.get(session_id)
        if device is not None:
            device["last_seen_at"] = at

    async def rotate_refresh(self, refresh_hash: str, new_hash: str, new_expires_at: datetime,
                             now: datetime) -> tuple[str, Record | None]:
        device = self._by_refresh.get(refresh_hash)
        if device is not None:
            if device["refresh_expires_at"] <= now:
                return "expired", _public_device(device)
            del self._by_refresh[refresh_hash]
            device["spent"] = [*device["spent"], refresh_hash][-SPENT_KEPT:]
            device.update(refresh_hash=new_hash, refresh_expires_at=new_expires_at, rotated_at=now)
            self._by_refresh[new_hash] = device
            return "rotated", _public_device(device)
        for device in self._sessions.values():
            if refresh_hash in device["spent"]:
                return "spent", _public_device(device)
        return "unknown", None

    async def renew_session(self, session_id: str, refresh_hash: str, refresh_expires_at: datetime) -> Record | None:
        device = self._sessions.get(session_id)
        if device is None:
            return None
        self._by_refresh.pop(device["refresh_hash"], None)
        device.update(refresh_hash=refresh_hash, refresh_expires_at=refresh_expires_at)
        self._by_refresh[refresh_hash] = device
        return _public_device(device)

    async def revoke_devices(self, user_id: str, device_id: int | None = None,
                             keep_session: str | None = None) -> list[Record]:
        live = self._devices.get(user_id, {})
        gone = [d for d in list(live.values())
                if (device_id is None or d["device_id"] == device_id) and d["session_id"] != keep_session]
        for device in gone:
            del live[device["device_id"]]
            del self._sessions[device["session_id"]]
            self._by_refresh.pop(device["refresh_hash"], None)
            self._prekeys.pop(device["session_id"], None)
            self._prekey_ids.pop(device["session_id"], None)
        return [_public_device(d) for d in gone]

    # -- push registrations ---------------------------------------------------------------
    async def set_push(self, session_id: str, registration: Record | None) -> bool:
        device = self._sessions.get(session_id)
        if device is None:
            return False
        device["push"] = _copy(registration) if registration else None
        return True

    async def drop_push(self, session_id: str, registration: Record) -> None:
        device = self._sessions.get(session_id)
        if device is not None and device.get("push") == registration:
            device["push"] = None

    async def push_registrations(self, user_ids: list[str]) -> list[Record]:
        now = utcnow()
        return [{"user_id": d["user_id"], "device_id": d["device_id"], "session_id": d["session_id"],
                 "push": _copy(d["push"])}
                for user_id in dict.fromkeys(user_ids) for _, d in sorted(self._devices.get(user_id, {}).items())
                if d.get("push") and d["refresh_expires_at"] > now]

    # -- the key directory ------------------------------------------------------------
    async def set_key_bundle(self, session_id: str, bundle: Record) -> tuple[bool, bytes | None]:
        device = self._sessions.get(session_id)
        if device is None:
            return False, None
        before = device.get("keys")
        previous = before["identity_key"] if before else None
        if previous is not None and previous != bundle["identity_key"]:
            self._prekeys.pop(session_id, None)
            self._prekey_ids.pop(session_id, None)
        device["keys"] = _copy(bundle)
        return True, previous

    async def key_bundles(self, user_id: str) -> list[Record]:
        now = utcnow()
        return [{**_copy(d["keys"]), "device_id": d["device_id"], "session_id": d["session_id"]}
                for _, d in sorted(self._devices.get(user_id, {}).items())
                if d.get("keys") and d["refresh_expires_at"] > now]

    async def add_prekeys(self, session_id: str, pools: dict[str, list[Record]], max_keys: int) -> bool:
        if session_id not in self._sessions:
            return False
        held = self._prekeys.setdefault(session_id, {"ec": {}, "pq": {}})
        new: dict[str, list[Record]] = {}
        for kind, keys in pools.items():  # every check first: all or none
            pool = held[kind]
            new[kind] = []
            for key in keys:
                kept = pool.get(key["key_id"])
                if kept is None:
                    new[kind].append(key)
                elif kept != key:
                    raise PrekeyIdTaken(kind)
            if len(pool) + len(new[kind]) > max_keys:
                raise TooManyPrekeys(kind)
        ids = self._prekey_ids.setdefault(session_id, {"ec": [], "pq": []})
        for kind, keys in new.items():
            for key in keys:
                held[kind][key["key_id"]] = dict(key)
                heapq.heappush(ids[kind], key["key_id"])
        return True

    async def count_prekeys(self, session_id: str) -> dict[str, int] | None:
        device = self._sessions.get(session_id)
        if device is None or not device.get("keys"):
            return None
        pools = self._prekeys.get(session_id, {})
        return {kind: len(pools.get(kind, ())) for kind in ("ec", "pq")}

    async def take_prekey(self, session_id: str, kind: str) -> Record | None:
        pool = self._prekeys.get(session_id, {}).get(kind)
        if not pool:
            return None
        return pool.pop(heapq.heappop(self._prekey_ids[session_id][kind]))

    async def search_users(self, prefix: str, limit: int, after: str | None = None) -> list[Record]:
        start = bisect.bisect_left(self._sorted_names, prefix)
        if after is not None:
            start = max(start, bisect.bisect_right(self._sorted_names, after))
        found = []
        for name in self._sorted_names[start:]:
            if not name.startswith(prefix) or len(found) >= limit:
                break
            found.append(_public_user(self._users[self._user_by_name[name]]))
        return found

    # -- conversations -------------------------------------------------------
    def _new_conversation(self, kind: str, creator_id: str, participant_ids: list[str],
                          title: str | None) -> Record:
        now = utcnow()
        conversation = {"id": new_id(), "kind": kind, "participant_ids": list(participant_ids),
                        "requests": [m for m in participant_ids if m != creator_id],
                        "admins": [creator_id] if kind == "group" else [], "former": [],
                        "title": title, "created_by": creator_id, "created_at": now,
                        "last_activity_at": now, "last_seq": 0, "last_message": None, "message_ttl": None,
                        "pending_seqs": []}  # a send here is one step: never a seq without its message
        self._conversations[conversation["id"]] = conversation
        self._by_conversation[conversation["id"]] = []
        for user_id in participant_ids:
            self._member_of.setdefault(user_id, set()).add(conversation["id"])
        return conversation

    def _join(self, conversation: Record, user_id: str, request: bool) -> None:
        conversation["participant_ids"].append(user_id)
        if request:
            conversation["requests"].append(user_id)
        conversation["former"] = [f for f in conversation["former"] if f["user_id"] != user_id]
        self._member_of.setdefault(user_id, set()).add(conversation["id"])

    async def get_or_create_direct(self, creator_id: str, other_id: str) -> tuple[Record, bool]:
        pair = (min(creator_id, other_id), max(creator_id, other_id))
        existing = self._direct.get(pair)
        if existing is None:
            conversation = self._new_conversation("direct", creator_id, [creator_id, other_id], None)
            self._direct[pair] = conversation["id"]
            return _copy(conversation), True
        conversation = self._conversations[existing]
        if creator_id in conversation["participant_ids"]:
            conversation["requests"] = [m for m in conversation["requests"] if m != creator_id]
        else:
            self._join(conversation, creator_id, request=False)
        if other_id not in conversation["participant_ids"]:
            self._join(conversation, other_id, request=True)
        return _copy(conversation), False

    async def create_group(self, creator_id: str, participant_ids: list[str], title: str | None) -> Record:
        return _copy(self._new_conversation("group", creator_id, participant_ids, title))

    async def get_conversation(self, conversation_id: str) -> Record | None:
        conversation = self._conversations.get(conversation_id)
        return _copy(conversation) if conversation else None

    async def list_conversations(self, user_id: str, limit: int, before: tuple[datetime, str] | None = None,
                                 filter: str = "all") -> list[Record]:
        mine = (self._conversations[i] for i in self._member_of.get(user_id, ()))
        if filter != "all":
            mine = (c for c in mine if (user_id in c["requests"]) == (filter == "requests"))
        keyed = sorted(((c["last_activity_at"], c["id"]) for c in mine), reverse=True)
        if before is not None:
            keyed = [k for k in keyed if k < before]
        return [_copy(self._conversations[cid]) for _, cid in keyed[:limit]]

    def _member(self, conversation_id: str, user_id: str) -> Record | None:
        conversation = self._conversations.get(conversation_id)
        return conversation if conversation and user_id in conversation["participant_ids"] else None

    async def accept_conversation(self, conversation_id: str, user_id: str) -> Record | None:
        conversation = self._member(conversation_id, user_id)
        if conversation is None:
            return None
        conversation["requests"] = [m for m in conversation["requests"] if m != user_id]
        return _copy(conversation)

    async def leave_conversation(self, conversation_id: str, user_id: str) -> Record | None:
        conversation = self._member(conversation_id, user_id)
        if conversation is None:
            return None
        members = [m for m in conversation["participant_ids"] if m != user_id]
        requests = [m for m in conversation["requests"] if m != user_id]
        admins = [m for m in conversation["admins"] if m != user_id]
        if conversation["kind"] == "group" and not admins and members:
            admins = [next((m for m in members if m not in requests), members[0])]
        conversation.update(participant_ids=members, requests=requests, admins=admins, former=[
            *(f for f in conversation["former"] if f["user_id"] != user_id),
            {"user_id": user_id, "up_to_seq": conversation["last_seq"], "title": conversation["title"],
             "left_at": utcnow()}])
        self._member_of.get(user_id, set()).discard(conversation_id)
        return _copy(conversation)

    async def add_members(self, conversation_id: str, user_ids: list[str],
                          max_members: int) -> tuple[Record, list[str]] | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return None
        added = [u for u in dict.fromkeys(user_ids) if u not in conversation["participant_ids"]]
        if len(conversation["participant_ids"]) + len(added) > max_members:
            raise ValueError("too many members")
        for user_id in added:
            self._join(conversation, user_id, request=True)
        return _copy(conversation), added

    async def set_admin(self, conversation_id: str, user_id: str, admin: bool) -> Record | None:
        conversation = self._member(conversation_id, user_id)
        if conversation is None:
            return None
        admins = [m for m in conversation["admins"] if m != user_id]
        conversation["admins"] = [*admins, user_id] if admin else admins
        return _copy(conversation)

    async def set_title(self, conversation_id: str, title: str | None) -> Record | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return None
        conversation["title"] = title
        return _copy(conversation)

    async def set_message_ttl(self, conversation_id: str, ttl: int | None) -> Record | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return None
        conversation["message_ttl"] = ttl
        return _copy(conversation)

    async def contact_ids(self, user_id: str) -> set[str]:
        contacts: set[str] = set()
        for conversation_id in self._member_of.get(user_id, ()):
            conversation = self._conversations[conversation_id]
            if user_id not in conversation["requests"]:
                contacts.update(m for m in conversation["participant_ids"] if m not in conversation["requests"])
        contacts.discard(user_id)
        return contacts - self._blocks.get(user_id, {}).keys() - self._blockers.get(user_id, set())

    async def shares_conversation(self, user_id: str, other_id: str, accepted_by: str | None = None) -> bool:
        for conversation_id in self._member_of.get(user_id, set()) & self._member_of.get(other_id, set()):
            if accepted_by is None or accepted_by not in self._conversations[conversation_id]["requests"]:
                return True
        return False

    # -- blocks ----------------------------------------------------------------
    async def block_user(self, blocker_id: str, blocked_id: str) -> None:
        self._blocks.setdefault(blocker_id, {}).setdefault(blocked_id, utcnow())
        self._blockers.setdefault(blocked_id, set()).add(blocker_id)

    async def unblock_user(self, blocker_id: str, blocked_id: str) -> None:
        self._blocks.get(blocker_id, {}).pop(blocked_id, None)
        self._blockers.get(blocked_id, set()).discard(blocker_id)

    async def list_blocks(self, blocker_id: str) -> list[Record]:
        blocks = sorted(self._blocks.get(blocker_id, {}).items(), key=lambda b: b[1], reverse=True)
        return [{"user_id": user_id, "blocked_at": at} for user_id, at in blocks]

    async def blockers_of(self, user_id: str) -> set[str]:
        return set(self._blockers.get(user_id, ()))

    # -- messages ------------------------------------------------------------
    async def add_message(self, conversation_id: str, sender_id: str, client_message_id: str,
                          ciphertext: bytes | None, content: Record | None,
                          ttl: int | None = None) -> tuple[Record, bool]:
        existing = self._by_client_id.get((sender_id, client_message_id))
        if existing is not None:
            return _copy(self._messages[existing]), False
        conversation = self._conversations[conversation_id]
        seq = conversation["last_seq"] + 1
        now = utcnow()
        message = {"id": new_id(), "conversation_id": conversation_id, "sender_id": sender_id,
                   "seq": seq, "client_message_id": client_message_id, "created_at": now,
                   "expires_at": now + timedelta(seconds=ttl) if ttl else None,
                   "content": dict(content) if content else None, "ciphertext": ciphertext,
                   "blob_id": None, "tombstone": None}
        self._messages[message["id"]] = message
        self._by_conversation[conversation_id].append(message)
        if message["expires_at"] is not None:
            heapq.heappush(self._expiring, (message["expires_at"], message["id"]))
        self._by_client_id[(sender_id, client_message_id)] = message["id"]
        conversation.update(last_seq=seq, last_activity_at=message["created_at"],
                            last_message=_metadata(message))
        faults.point("memory.send.stored")
        return _copy(message), True

    async def senders_between(self, conversation_id: str, after_seq: int, up_to_seq: int) -> set[str]:
        log = self._by_conversation.get(conversation_id, [])
        return {m["sender_id"] for m in log[max(after_seq, 0):max(up_to_seq, 0)] if m and m["sender_id"]}

    async def get_message(self, message_id: str) -> Record | None:
        message = self._messages.get(message_id)
        return _copy(message) if message and _live(message, utcnow()) else None

    async def list_messages(self, conversation_id: str, *, before: int | None = None,
                            after: int | None = None, limit: int = 50) -> tuple[list[Record], bool]:
        log = self._by_conversation.get(conversation_id, [])
        now = utcnow()
        if after is not None:
            indexes = range(max(after, 0), len(log))
        else:
            stop = len(log) if before is None else min(max(before - 1, 0), len(log))
            indexes = range(stop - 1, -1, -1)
        page: list[Record] = []
        for index in indexes:  # expired and forgotten ones are holes: skip them, fill the page
            message = log[index]
            if _live(message, now):
                if len(page) == limit:
                    break
                page.append(_copy(message))
        else:
            return (page if after is not None else page[::-1]), False
        return (page if after is not None else page[::-1]), True

    async def attach_content(self, message_id: str, blob_id: str, size: int, sha256: str) -> Record:
        message = self._messages[message_id]
        if message["content"] is None:
            message.update(content={"size": size, "sha256": sha256, "inline": False}, blob_id=blob_id)
            conversation = self._conversations[message["conversation_id"]]
            if conversation["last_seq"] == message["seq"]:
                conversation["last_message"] = _metadata(message)
        return _copy(message)

    async def count_unread(self, conversation_id: str, user_id: str, after_seq: int,
                           ignoring: Iterable[str] = ()) -> int:
        log = self._by_conversation.get(conversation_id, [])
        skip, now = {user_id, *ignoring}, utcnow()
        return sum(1 for m in log[max(after_seq, 0):]
                   if _live(m, now) and m["sender_id"] not in skip and not m.get("tombstone"))

    async def forget_messages(self, now: datetime, created_before: datetime | None = None,
                              limit: int = 1000) -> int:
        gone: dict[str, Record] = {}
        while self._expiring and self._expiring[0][0] <= now and len(gone) < limit:
            message = self._messages.get(heapq.heappop(self._expiring)[1])
            if message is not None:
                gone[message["id"]] = message
        if created_before is not None:
            for log in self._by_conversation.values():
                for message in log:  # in seq order, so in time order: stop at the first newer one
                    if len(gone) >= limit or (message is not None and message["created_at"] >= created_before):
                        break
                    if message is not None:
                        gone[message["id"]] = message
        touched = set()
        for message in gone.values():
            del self._messages[message["id"]]
            self._by_client_id.pop((message["sender_id"], message["client_message_id"]), None)
            self._by_conversation[message["conversation_id"]][message["seq"] - 1] = None
            if message["blob_id"]:
                self._blobs.pop(message["blob_id"], None)
            touched.add(message["conversation_id"])
        for conversation_id in touched:
            conversation = self._conversations[conversation_id]
            last = conversation["last_message"]
            if last is not None and last["id"] not in self._messages:
                newest = next((m for m in reversed(self._by_conversation[conversation_id]) if m), None)
                conversation["last_message"] = _metadata(newest) if newest else None
        return len(gone)

    async def forget_calls(self, ended_before: datetime) -> int:
        gone = [i for i, c in self._calls.items() if c["ended_at"] is not None and c["ended_at"] < ended_before]
        for call_id in gone:
            del self._calls[call_id]
        return len(gone)

    async def take_lease(self, name: str, owner: str, seconds: float) -> bool:
        now = utcnow()
        holder, until = self._leases.get(name, (owner, now))
        if holder != owner and until > now:
            return False
        self._leases[name] = (owner, now + timedelta(seconds=seconds))
        return True

    # -- receipts ------------------------------------------------------------
    async def advance_receipt(self, conversation_id: str, user_id: str, kind: ReceiptKind,
                              seq: int) -> tuple[Record, Record]:
        cursors = self._receipts.setdefault(conversation_id, {})
        receipt = cursors.setdefault(user_id, {"user_id": user_id, "delivered_seq": 0, "read_seq": 0})
        before = {"delivered_seq": receipt["delivered_seq"], "read_seq": receipt["read_seq"]}
        receipt["delivered_seq"] = max(receipt["delivered_seq"], seq)
        if kind == "read":
            receipt["read_seq"] = max(receipt["read_seq"], seq)
        return dict(receipt), before

    async def get_receipts(self, conversation_id: str) -> dict[str, Record]:
        return {k: dict(v) for k, v in self._receipts.get(conversation_id, {}).items()}

    # -- blobs ---------------------------------------------------------------
    async def open_blob_writer(self, max_size: int) -> BlobWriter:
        return MemoryBlobWriter(self, max_size)

    async def read_blob(self, blob_id: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if blob_id not in self._blobs:
            raise BlobNotFound(blob_id)
        chunks, size = self._blobs[blob_id]
        end = size if end is None else min(end, size)
        index, offset = divmod(start, BLOB_CHUNK_SIZE)
        position = start
        while position < end and index < len(chunks):
            piece = chunks[index][offset:offset + (end - position)]
            position += len(piece)
            index, offset = index + 1, 0
            yield piece

    async def delete_blob(self, blob_id: str) -> None:
        self._blobs.pop(blob_id, None)

    # -- presence ------------------------------------------------------------
    async def get_presences(self, user_ids: list[str]) -> dict[str, Record]:
        return {u: dict(self._presence[u]) for u in user_ids if u in self._presence}

    async def set_presence(self, user_id: str, *, status: str | None = None,
                           last_seen: datetime | None = None, show_last_seen: bool | None = None) -> Record:
        record = self._presence.setdefault(user_id, {"user_id": user_id, "status": "online", "last_seen": None,
                                                     "show_last_seen": True})
        if status is not None:
            record["status"] = status
        if last_seen is not None:
            record["last_seen"] = last_seen
        if show_last_seen is not None:
            record["show_last_seen"] = show_last_seen
        return dict(record)

    # -- calls ---------------------------------------------------------------
    async def create_call(self, caller_id: str, callee_id: str, media: str,
                          ring_deadline: datetime) -> Record:
        busy = any(c["status"] in LIVE_CALL_STATUSES and callee_id in (c["caller_id"], c["callee_id"])
                   for c in self._calls.values())
        now = utcnow()
        call = {"id": new_id(), "caller_id": caller_id, "callee_id": callee_id, "media": media,
                "status": "busy" if busy else "pending", "created_at": now,
                "ring_deadline": ring_deadline, "answered_at": None,
                "ended_at": now if busy else None, "end_reason": "busy" if busy else None,
                "ended_by": None}
        self._calls[call["id"]] = call
        return dict(call)

    async def get_call(self, call_id: str) -> Record | None:
        call = self._calls.get(call_id)
        return dict(call) if call else None

    async def transition_call(self, call_id: str, from_statuses: tuple[str, ...], to_status: str,
                              fields: Record) -> Record | None:
        call = self._calls.get(call_id)
        if call is None or call["status"] not in from_statuses:
            return None
        call.update(fields, status=to_status)
        return dict(call)

    async def list_active_calls(self, user_id: str) -> list[Record]:
        return self._calls_of(user_id, LIVE_CALL_STATUSES, None, None)

    async def list_call_history(self, user_id: str, limit: int,
                                before: tuple[datetime, str] | None = None) -> list[Record]:
        return self._calls_of(user_id, FINAL_CALL_STATUSES, limit, before)

    def _calls_of(self, user_id: str, statuses: tuple[str, ...], limit: int | None,
                  before: tuple[datetime, str] | None) -> list[Record]:
        calls = sorted((c for c in self._calls.values()
                        if c["status"] in statuses and user_id in (c["caller_id"], c["callee_id"])
                        and (before is None or (c["created_at"], c["id"]) < before)),
                       key=lambda c: (c["created_at"], c["id"]), reverse=True)
        return [dict(c) for c in calls[:limit]]

    async def due_pending_calls(self, now: datetime) -> list[Record]:
        return [dict(c) for c in self._calls.values()
                if c["status"] == "pending" and c["ring_deadline"] <= now]


def _live(message: Record | None, now: datetime) -> bool:
    """Not forgotten (a hole) and not expired."""
    return message is not None and (message["expires_at"] is None or message["expires_at"] > now)


def _metadata(message: Record) -> Record:
    """A message without its bytes or internal blob id: what a conversation keeps as last."""
    out: dict[str, Any] = {k: v for k, v in message.items() if k not in ("ciphertext", "blob_id")}
    if out["content"] is not None:
        out["content"] = dict(out["content"])
    return out
