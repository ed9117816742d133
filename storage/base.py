"""The `Storage` interface every backend implements, and the records it speaks.

Records are plain dicts with string ids and timezone-aware UTC datetimes
(millisecond precision, so every backend round-trips them identically).
Callers own what they get back: backends never hand out their internal state.
"""
from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timezone
from typing import Any, Literal

Record = dict[str, Any]
ReceiptKind = Literal["delivered", "read"]

# Call statuses; the first two are "live", the rest are final.
LIVE_CALL_STATUSES = ("pending", "accepted")
FINAL_CALL_STATUSES = ("rejected", "busy", "ended", "missed")
# A Signal-protocol address is (user id, device id), and libsignal takes device ids 1..127.
MAX_DEVICE_ID = 127


class StorageError(Exception):
    """Base of the errors a backend raises on purpose."""


class UsernameTaken(StorageError):
    """The username exists already (compared case-insensitively)."""


class TooManyDevices(StorageError):
    """The user already has the most live devices allowed; `devices` lists them."""

    def __init__(self, devices: list["Record"]) -> None:
        super().__init__(f"{len(devices)} live devices")
        self.devices = devices


class BlobTooLarge(StorageError):
    """A blob upload went past its size limit; nothing of it was kept."""


class BlobNotFound(StorageError):
    """No blob with that id."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached right now; retry later (HTTP 503)."""


class PrekeyIdTaken(StorageError):
    """A one-time prekey id the device's pool holds already, with another key; nothing was added.
    `args[0]` is the pool's kind."""


class TooManyPrekeys(StorageError):
    """Adding these one-time prekeys would take a pool past its cap; nothing was added.
    `args[0]` is the pool's kind."""


def new_id() -> str:
    """A fresh opaque id: 24 hex characters, like a MongoDB ObjectId."""
    return secrets.token_hex(12)


def utcnow() -> datetime:
    """Now in UTC, truncated to milliseconds (MongoDB's date precision)."""
    # fromtimestamp rounds to the nearest microsecond, so whole milliseconds stay exact.
    return datetime.fromtimestamp(time.time_ns() // 1_000_000 / 1000, timezone.utc)


class BlobWriter(ABC):
    """An upload in progress: feed chunks, then `finish()` or `abort()`.

    The writer counts bytes and computes the sha256 as chunks arrive; when
    the total passes `max_size` it discards what it wrote and raises
    `BlobTooLarge`, so a refused upload leaves nothing behind.
    """

    blob_id: str

    @abstractmethod
    async def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    async def finish(self) -> tuple[int, str]:
        """Seal the blob; return `(size, sha256_hex)`."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop everything written so far (safe to call more than once)."""


class Storage(ABC):
    """Async persistence for Kisse. Each method is one atomic step."""

    # Exceptions that mean "backend unreachable": the API answers them with 503.
    unavailable_errors: tuple[type[BaseException], ...] = (StorageUnavailable,)

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        """Prepare the backend (migrations, indexes). Default: nothing to do."""

    @abstractmethod
    async def ping(self) -> None:
        """Return if the backend answers; raise `StorageUnavailable` otherwise."""

    @abstractmethod
    async def close(self) -> None: ...

    # -- users ---------------------------------------------------------------
    @abstractmethod
    async def create_user(self, username: str, password_hash: str, display_name: str) -> Record:
        """Create `{id, username, display_name, created_at}`; raise `UsernameTaken`."""

    @abstractmethod
    async def get_user(self, user_id: str) -> Record | None: ...

    @abstractmethod
    async def get_users(self, user_ids: list[str]) -> list[Record]:
        """The users that exist among `user_ids`, in any order."""

    @abstractmethod
    async def get_credentials(self, username: str) -> tuple[Record, str] | None:
        """`(user, password_hash)` for a username, matched case-insensitively."""

    @abstractmethod
    async def search_users(self, prefix: str, limit: int, after: str | None = None) -> list[Record]:
        """Users whose lower-cased username starts with `prefix` (lower-case),
        ordered by lower-cased username, strictly after `after` when given."""

    @abstractmethod
    async def set_password_hash(self, user_id: str, password_hash: str) -> None: ...

    @abstractmethod
    async def delete_user(self, user_id: str) -> None:
        """Erase an account: its credentials, devices and sessions, presence, and
        the ciphertext and blobs of the messages it sent. Those messages keep
        their metadata and their seq, as tombstones "sender_deleted". The user
        record stays, `deleted` and renamed, so that the username stays taken;
        it no longer logs in or shows up in searches."""

    # -- devices and their sessions ------------------------------------------------
    # A device is one installation of an app: `{user_id, device_id (1..127, the
    # lowest free one), name, created_at, last_seen_at, session_id}`. Its one
    # session is the refresh token, stored as a hash: `refresh_hash`,
    # `refresh_expires_at`, the last spent hashes and when it was last rotated.
    @abstractmethod
    async def create_device(self, user_id: str, name: str, refresh_hash: str, refresh_expires_at: datetime,
                            max_devices: int) -> Record:
        """A new device, with the lowest device id 1..127 no live device of the user
        has; raise `TooManyDevices` when `max_devices` are live. Devices whose
        refresh token has expired are deleted first: they hold no slot."""

    @abstractmethod
    async def list_devices(self, user_id: str) -> list[Record]:
        """The user's live devices, by device id."""

    @abstractmethod
    async def get_session(self, session_id: str) -> Record | None:
        """The live device whose session this is, or None (revoked, or never was)."""

    @abstractmethod
    async def session_of_refresh(self, refresh_hash: str) -> Record | None:
        """The live device whose current refresh token this is, or None."""

    @abstractmethod
    async def touch_device(self, session_id: str, at: datetime) -> None:
        """Set `last_seen_at`."""

    @abstractmethod
    async def rotate_refresh(self, refresh_hash: str, new_hash: str, new_expires_at: datetime,
                             now: datetime) -> tuple[str, Record | None]:
        """Spend a refresh token for a new one, in one atomic step: of any number of
        racing calls with one token, exactly one rotates. Returns
        `("rotated", device)`, or the token's state and its device: `("spent", device)`
        (rotated away before: `device["rotated_at"]` says when), `("expired", device)`,
        `("unknown", None)`."""

    @abstractmethod
    async def renew_session(self, session_id: str, refresh_hash: str, refresh_expires_at: datetime) -> Record | None:
        """Give a live session a new refresh token (the old one is no longer valid);
        None if the session is gone."""

    @abstractmethod
    async def revoke_devices(self, user_id: str, device_id: int | None = None,
                             keep_session: str | None = None) -> list[Record]:
        """Delete one device of the user (`device_id`), or all of them but the one
        with session `keep_session`, with their keys; return those deleted."""

    # -- push registrations -----------------------------------------------------------
    # A device's registration with its platform's push service, in its device record:
    # `{provider: "fcm" | "apns" | "webpush", token?, voip_token?, endpoint?, keys?}`.
    @abstractmethod
    async def set_push(self, session_id: str, registration: Record | None) -> bool:
        """Set (None: clear) the device's push registration; False if the device is gone."""

    @abstractmethod
    async def drop_push(self, session_id: str, registration: Record) -> None:
        """Clear the device's registration if it is still this one (the provider declared
        it dead; a newer one uploaded meanwhile stays)."""

    @abstractmethod
    async def push_registrations(self, user_ids: list[str]) -> list[Record]:
        """`{user_id, device_id, session_id, push}` for the live devices of these users
        that have a registration."""

    # -- the key directory (Signal protocol: public keys only) --------------------
    # Per device session: a bundle `{registration_id, identity_key, signed_prekey,
    # pq_last_resort_prekey}` (keys are bytes; a prekey is `{key_id, public_key,
    # signature}`) and two pools of one-time prekeys, `"ec"` (`{key_id, public_key}`)
    # and `"pq"` (`{key_id, public_key, signature}`). A revoked device's keys go with it.
    @abstractmethod
    async def set_key_bundle(self, session_id: str, bundle: Record) -> tuple[bool, bytes | None]:
        """Set the device's bundle: `(device is live, identity key it had before)`. A new
        identity key empties the device's pools: their private halves left with the old one."""

    @abstractmethod
    async def key_bundles(self, user_id: str) -> list[Record]:
        """The bundles of the user's live devices (refresh token not expired) that
        uploaded one, by device id, each with its `device_id` and `session_id`."""

    @abstractmethod
    async def add_prekeys(self, session_id: str, pools: dict[str, list[Record]], max_keys: int) -> bool:
        """Add one-time prekeys to the device's pools (`{"ec": [...], "pq": [...]}`, distinct
        key ids in each), all or none: a key a pool holds already, identical, is kept
        once (a retried upload); another key under a held id raises `PrekeyIdTaken`
        naming the kind; a pool past `max_keys` raises `TooManyPrekeys` naming it.
        False (and nothing kept) when the device is gone."""

    @abstractmethod
    async def count_prekeys(self, session_id: str) -> dict[str, int] | None:
        """`{"ec": n, "pq": n}` one-time prekeys left, or None for a device with no bundle."""

    @abstractmethod
    async def take_prekey(self, session_id: str, kind: str) -> Record | None:
        """Remove one key of the pool and return it (lowest key id first): of any number
        of racing takes, each key goes to one, once, ever. None when the pool is empty."""

    # -- conversations -------------------------------------------------------
    # `pending_seqs` are seqs handed out to sends not numbered yet (a hole for a moment,
    # never an expired message). A conversation's members are `participant_ids` (in the order they joined);
    # `requests` are the members who have not accepted it yet; `admins` run a
    # group; `former` is `[{user_id, up_to_seq, title, left_at}]`: who left (or
    # was removed, or declined), the last seq they may still read, and the
    # title and time when they did. Every change of
    # membership is one atomic step, so racing changes never lose one another.
    @abstractmethod
    async def get_or_create_direct(self, creator_id: str, other_id: str) -> tuple[Record, bool]:
        """The one direct conversation of a pair, created if needed: `(conv, created)`.
        Afterwards both are members and the creator has accepted it (creating it
        again accepts a pending request, or re-joins it); the other, if they
        were not a member (new, declined, left), is one now with a request."""

    @abstractmethod
    async def create_group(self, creator_id: str, participant_ids: list[str], title: str | None) -> Record:
        """A new group; `participant_ids` includes the creator, its admin, who has
        accepted it; everyone else gets a request."""

    @abstractmethod
    async def get_conversation(self, conversation_id: str) -> Record | None:
        """`{id, kind, participant_ids, requests, admins, former, title, created_by,
        created_at, last_activity_at, last_seq, last_message}`."""

    @abstractmethod
    async def list_conversations(self, user_id: str, limit: int, before: tuple[datetime, str] | None = None,
                                 filter: str = "all") -> list[Record]:
        """A member's conversations, most recent activity first (ties by id,
        descending); `before` is the `(last_activity_at, id)` of the previous page's
        last; `filter` "accepted", "requests" (pending for this user) or "all"."""

    @abstractmethod
    async def accept_conversation(self, conversation_id: str, user_id: str) -> Record | None:
        """The member has accepted it (no-op if they had); None if not a member."""

    @abstractmethod
    async def leave_conversation(self, conversation_id: str, user_id: str) -> Record | None:
        """The member is out (left, removed or declined): not a member, not a request,
        not an admin; in `former` with the conversation's `last_seq`. A group whose
        last admin left gets one: its longest-standing member who has accepted (else
        its longest-standing member). None if they were not a member."""

    @abstractmethod
    async def add_members(self, conversation_id: str, user_ids: list[str],
                          max_members: int) -> tuple[Record, list[str]] | None:
        """Add these users as members with a request (members already are skipped):
        `(conversation, the ids added)`. None if there is no such conversation;
        ValueError (nothing added) if there would be more than `max_members`."""

    @abstractmethod
    async def set_admin(self, conversation_id: str, user_id: str, admin: bool) -> Record | None:
        """Make a member an admin of the group, or not; None if not a member."""

    @abstractmethod
    async def set_title(self, conversation_id: str, title: str | None) -> Record | None: ...

    @abstractmethod
    async def set_message_ttl(self, conversation_id: str, ttl: int | None) -> Record | None:
        """Set `message_ttl` (seconds; None: off): messages added from now on expire that long
        after they are created. None if there is no such conversation."""

    @abstractmethod
    async def contact_ids(self, user_id: str) -> set[str]:
        """The user's contacts: everyone who shares a conversation with them that
        both have accepted, unless either blocked the other (kisse/contacts.py)."""

    # -- blocks ----------------------------------------------------------------
    @abstractmethod
    async def block_user(self, blocker_id: str, blocked_id: str) -> None:
        """Idempotent; the first time is the one `blocked_at` keeps."""

    @abstractmethod
    async def unblock_user(self, blocker_id: str, blocked_id: str) -> None: ...

    @abstractmethod
    async def list_blocks(self, blocker_id: str) -> list[Record]:
        """`[{user_id, blocked_at}]` of whom the user blocked, newest first."""

    @abstractmethod
    async def blockers_of(self, user_id: str) -> set[str]:
        """Who has blocked this user."""

    @abstractmethod
    async def shares_conversation(self, user_id: str, other_id: str, accepted_by: str | None = None) -> bool:
        """Whether both users are members of one conversation (that `accepted_by`, one of
        them, has accepted, when given)."""

    # -- messages ------------------------------------------------------------
    @abstractmethod
    async def add_message(self, conversation_id: str, sender_id: str, client_message_id: str,
                          ciphertext: bytes | None, content: Record | None,
                          ttl: int | None = None) -> tuple[Record, bool]:
        """Append a message with the next `seq` of its conversation, or return the
        sender's existing message with that `client_message_id`: `(message, created)`.

        A message is `{id, conversation_id, sender_id, seq, client_message_id,
        created_at, expires_at, content: {size, sha256, inline} | None, ciphertext: bytes | None,
        blob_id: str | None, tombstone: None}`; `expires_at` is `created_at` + `ttl` seconds
        (None without a ttl). Creating one also updates the conversation's
        `last_seq`, `last_message` and `last_activity_at`.

        An expired message is gone for every read (get, list, count) at once, and
        from storage at the next `forget_messages`.

        `created` is True for exactly one call per message, the one that made it
        visible (and so should publish it). A retry after a failed attempt
        finishes that attempt's work: it never makes a second message or a gap.
        A backend that cannot make this atomic may leave a *tombstone* in a seq
        it could not use: a message record with `tombstone` set (e.g. "unused"),
        no sender, no content, which history returns like any other.
        """

    async def repair_sends(self, older_than: datetime,
                           in_flight: set[tuple[str, str]] = frozenset()) -> list[Record]:  # type: ignore[assignment]
        """Finish sends left part-way since before `older_than` (their attempts died)
        but those whose `(sender_id, client_message_id)` is `in_flight` here, and
        return the messages this made visible (to publish). Default: a backend
        whose sends are atomic has nothing to repair."""
        return []

    @abstractmethod
    async def senders_between(self, conversation_id: str, after_seq: int, up_to_seq: int) -> set[str]:
        """Who sent the messages numbered `after_seq + 1 .. up_to_seq` (tombstones aside)."""

    @abstractmethod
    async def get_message(self, message_id: str) -> Record | None: ...

    @abstractmethod
    async def list_messages(self, conversation_id: str, *, before: int | None = None,
                            after: int | None = None, limit: int = 50) -> tuple[list[Record], bool]:
        """A page in ascending `seq` and whether more exist past it.

        `after=N`: the first `limit` messages with seq > N (more = later ones exist).
        Otherwise the last `limit` messages with seq < `before` (or the newest),
        more = earlier ones exist.
        """

    @abstractmethod
    async def attach_content(self, message_id: str, blob_id: str, size: int, sha256: str) -> Record:
        """Give a content-less message its blob (compare-and-set) and return the
        message as stored afterwards: if it already had content, that content is
        unchanged and the caller compares to see whether it won."""

    @abstractmethod
    async def count_unread(self, conversation_id: str, user_id: str, after_seq: int,
                           ignoring: Iterable[str] = ()) -> int:
        """Messages (not tombstones) with seq > `after_seq` sent by someone other than
        `user_id` and not by anyone in `ignoring` (whom they blocked)."""

    @abstractmethod
    async def forget_messages(self, now: datetime, created_before: datetime | None = None,
                              limit: int = 1000) -> int:
        """Delete up to `limit` messages that expired by `now` (and, with `created_before`,
        those created before it: retention) with their ciphertext and blobs; a
        conversation whose last message went points `last_message` at the newest one
        left (or None). Return how many went: call again while it returns `limit`."""

    @abstractmethod
    async def forget_calls(self, ended_before: datetime) -> int:
        """Delete the calls that ended before this (call history retention); how many went."""

    @abstractmethod
    async def take_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Hold the named lease for `seconds` (renewing it if `owner` holds it); False
        while another owner holds it. One sweeper in a cluster, not one per node."""

    # -- receipts ------------------------------------------------------------
    @abstractmethod
    async def advance_receipt(self, conversation_id: str, user_id: str, kind: ReceiptKind,
                              seq: int) -> tuple[Record, Record]:
        """Move a member's cursor forward (never back); read also moves delivered.
        Return `({user_id, delivered_seq, read_seq} as stored afterwards,
        {delivered_seq, read_seq} as they were before)`."""

    @abstractmethod
    async def get_receipts(self, conversation_id: str) -> dict[str, Record]:
        """Every member's cursors that exist, keyed by user id."""

    # -- blobs ---------------------------------------------------------------
    @abstractmethod
    async def open_blob_writer(self, max_size: int) -> BlobWriter: ...

    @abstractmethod
    def read_blob(self, blob_id: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes `[start, end)` of a blob in chunks; raise `BlobNotFound`."""

    @abstractmethod
    async def delete_blob(self, blob_id: str) -> None:
        """Remove a blob; no error if it is already gone."""

    # -- presence ------------------------------------------------------------
    @abstractmethod
    async def get_presences(self, user_ids: list[str]) -> dict[str, Record]:
        """`{user_id, status, last_seen, show_last_seen}` as last stored, by user id, for those
        that have one."""

    @abstractmethod
    async def set_presence(self, user_id: str, *, status: str | None = None,
                           last_seen: datetime | None = None, show_last_seen: bool | None = None) -> Record:
        """Update the chosen status, last_seen and/or show_last_seen; return the stored
        record. A new record starts with status "online", last_seen None, show_last_seen True."""

    # -- calls ---------------------------------------------------------------
    @abstractmethod
    async def create_call(self, caller_id: str, callee_id: str, media: str,
                          ring_deadline: datetime) -> Record:
        """Record a call: `pending`, or `busy` (already final) when the callee is in
        a pending or accepted call. The check and insert are one atomic step.

        A call is `{id, caller_id, callee_id, media, status, created_at,
        ring_deadline, answered_at, ended_at, end_reason, ended_by}`.
        """

    @abstractmethod
    async def get_call(self, call_id: str) -> Record | None: ...

    @abstractmethod
    async def transition_call(self, call_id: str, from_statuses: tuple[str, ...], to_status: str,
                              fields: Record) -> Record | None:
        """Compare-and-set: if the call's status is in `from_statuses`, set
        `to_status` and `fields` and return the updated call; otherwise None."""

    @abstractmethod
    async def list_active_calls(self, user_id: str) -> list[Record]:
        """The user's pending and accepted calls, newest first."""

    @abstractmethod
    async def list_call_history(self, user_id: str, limit: int,
                                before: tuple[datetime, str] | None = None) -> list[Record]:
        """The user's final calls (either side), newest `created_at` first, ties by
        id descending; `before` is the previous page's last `(created_at, id)`."""

    @abstractmethod
    async def due_pending_calls(self, now: datetime) -> list[Record]:
        """Pending calls whose `ring_deadline` is at or before `now`."""
