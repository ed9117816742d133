"""A messaging client that does what docs/API.md asks of an app, as a reference
and as the load in the recovery tests (tests/test_restart.py) and benchmarks.

One `TrafficClient` is one device of one user, on one WebSocket:

* **Connect** to `/ws?token=…`. Any failure (refused, timed out, a 503 at the
  handshake) is retried with exponential backoff and jitter: `base`, `2 base`,
  `4 base`… capped at `cap`, each ±50 % at random; the backoff resets after a
  connection that lived (its `sync` was answered). A 401 asks `relogin` for a
  fresh token first, when one is given. Apps use base 1 s and a cap of 30-60 s;
  the tests use 0.1 s and 1 s.
* **Sync** at once on every connection, with a cursor per conversation: the
  highest seq held *without a gap* (a seq missing below it would never come
  back if the cursor skipped it). A failed `sync` is sent again after backoff.
* **Outbox**: every `message.send` carries a `client_message_id` and stays in
  the outbox until its `ack`. At most `window` sends are in flight (sent and
  not answered) on a connection; the rest wait, in order.
* **Resend** what was not acked, with the *same* `client_message_id`, in the
  order it was first queued: after every reconnect (requests in flight when a
  connection closes are lost with it), and after an `error` frame:
  `shutting_down` on the next connection (this one is closing with 1001),
  `storage_unavailable` and `internal_error` on this connection after backoff.
  Any other error is the caller's mistake (a 4xx): the send is marked failed
  and not retried. The server makes retries safe: one message per client id.
* **Receive**: `message.new` is de-duplicated by seq (and checked: one seq,
  one message id) and kept per conversation; tombstones fill their seq and
  carry nothing. Other events are counted and otherwise ignored, as the API
  asks of clients for what they do not know.

Ordering: a connection's sends to one conversation are numbered in the order
they arrive, so sends acked in order keep their order across crashes and
restarts. A send answered with an `error` is resent later, and the sends
pipelined behind it may be numbered first: apps that need strict order after
errors pipeline one send per conversation.

Every send records when it was queued, first and last sent, acked, its seq and
how many attempts it took; the client records its connections, closes, syncs
and errors. Times are `time.monotonic()`.
"""
from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import math
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

# Errors after which the same send is tried again; anything else is a client mistake.
RESEND_ON_NEXT_CONNECTION = frozenset({"shutting_down"})
RESEND_AFTER_BACKOFF = frozenset({"storage_unavailable", "internal_error"})

clock = time.monotonic
_client_numbers = itertools.count(1)


class Backoff:
    """Exponential backoff with jitter: base, 2 base, 4 base… up to cap, each ×0.5-1.5."""

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.failures)
        self.failures += 1
        return delay * self.rng.uniform(0.5, 1.5)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class Send:
    """One message in the outbox, and what happened to it."""

    index: int  # position in the client's send order
    conversation_id: str
    client_message_id: str
    ciphertext: str | None
    queued_at: float
    first_sent_at: float | None = None
    last_sent_at: float | None = None
    acked_at: float | None = None
    seq: int | None = None
    message_id: str | None = None
    created: bool | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    failed: str | None = None  # the error code of a send that will not be retried
    backoff: Backoff | None = None

    @property
    def done(self) -> bool:
        return self.acked_at is not None or self.failed is not None


@dataclass
class Close:
    at: float
    code: int | None
    reason: str | None


class TrafficClient:
    """One device: a WebSocket that reconnects, syncs, and sends from an outbox."""

    def __init__(self, base_url: str, token: str, *, user_id: str | None = None,
                 conversations: Iterable[str] = (), window: int = 20,
                 backoff_base: float = 1.0, backoff_cap: float = 30.0, connect_timeout: float = 10.0,
                 relogin: Callable[[], Awaitable[str]] | None = None, mark_delivered: bool = False,
                 name: str | None = None, seed: int | None = None, failover: Iterable[str] = ()) -> None:
        # `failover`: other nodes' base URLs, tried in turn after a failed connect (what a
        # load balancer in front of a cluster does for a node that is gone).
        self.ws_urls = [u.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"
                        for u in (base_url, *failover)]
        self.ws_url = self.ws_urls[0]
        self.token, self.user_id = token, user_id
        self.window, self.connect_timeout = window, connect_timeout
        self.relogin, self.mark_delivered = relogin, mark_delivered
        self.name = name or f"client{next(_client_numbers)}"
        self.rng = random.Random(seed)
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self._reconnect = Backoff(backoff_base, backoff_cap, self.rng)
        self._resync = Backoff(backoff_base, backoff_cap, self.rng)

        self.sends: list[Send] = []
        self.by_client_id: dict[str, Send] = {}
        # conversation -> seq -> message id (None for a tombstone): what this device holds.
        self.seen: dict[str, dict[int, str | None]] = {c: {} for c in conversations}
        self.deliveries: Counter[str] = Counter()  # message id -> message.new frames received
        self.conflicts: list[str] = []  # one seq with two message ids, one client id with two seqs
        self.connects: list[float] = []  # when each handshake succeeded
        self.connect_failures: list[tuple[float, str]] = []
        self.closes: list[Close] = []
        self.syncs: list[float] = []  # when each sync was acked
        self.error_codes: Counter[str] = Counter()
        self.events: Counter[str] = Counter()

        self._conn: WebSocketClientConnection | None = None
        self._queue: list[Send] = []  # to send on this connection, in send order
        self._inflight: dict[str, Send] = {}  # request id -> send
        self._timers: list[asyncio.TimerHandle] = []  # resends and re-syncs of this connection
        self._request_ids = itertools.count(1)
        self._sync_id: str | None = None
        self._synced = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- the app's side ------------------------------------------------------
    def start(self) -> "TrafficClient":
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        return self

    def send(self, conversation_id: str, client_message_id: str | None = None,
             ciphertext: str | None = None) -> Send:
        """Queue a message; it goes out as soon as the window allows."""
        index = len(self.sends)
        item = Send(index, conversation_id, client_message_id or f"{self.name}-{index}", ciphertext, clock())
        self.sends.append(item)
        self.by_client_id[item.client_message_id] = item
        self.seen.setdefault(conversation_id, {})
        self._queue.append(item)
        self._pump()
        return item

    def request(self, kind: str, data: dict[str, Any]) -> bool:
        """Send another request (typing, presence…) on the current connection, once:
        its reply is only counted in `events`. False when not connected."""
        return self._write(kind, data, f"r{next(self._request_ids)}")

    async def stop(self) -> None:
        """Close the connection and stop reconnecting."""
        self._stopping = True
        if self._conn is not None:
            self._conn.close(1000)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def cut(self) -> None:
        """Drop the TCP connection without a close handshake (a phone losing its network)."""
        conn = self._conn
        stream = getattr(getattr(conn, "protocol", None), "stream", None)
        if stream is None or stream.closed():
            return
        try:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        stream.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def synced(self) -> bool:
        """Connected and caught up since the last (re)connect."""
        return self._conn is not None and self._synced

    def unacked(self) -> list[Send]:
        return [s for s in self.sends if not s.done]

    def cursors(self) -> dict[str, int]:
        """Per conversation, the highest seq held with every seq below it held too."""
        out = {}
        for conversation_id, seqs in self.seen.items():
            top = 0
            while top + 1 in seqs:
                top += 1
            out[conversation_id] = top
        return out

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition()` holds (re-checked whenever this client's state changes)."""
        deadline = clock() + timeout
        while not condition():
            left = deadline - clock()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True

    # -- connection loop -------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            url = f"{self.ws_url}?token={self.token}"
            try:
                conn = await websocket_connect(
                    HTTPRequest(url, connect_timeout=self.connect_timeout, request_timeout=self.connect_timeout),
                    max_message_size=64 * 1024 * 1024)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # refused, reset, timed out, or an HTTP status instead of 101
                self.connect_failures.append((clock(), _describe(error)))
                self.ws_url = self.ws_urls[(self.ws_urls.index(self.ws_url) + 1) % len(self.ws_urls)]
                if isinstance(error, HTTPClientError) and error.code == 401 and self.relogin is not None:
                    try:
                        self.token = await self.relogin()
                    except Exception as relogin_error:  # noqa: BLE001 - retried after backoff
                        self.connect_failures.append((clock(), "relogin: " + _describe(relogin_error)))
                self._notify()
                await asyncio.sleep(self._reconnect.next())
                continue
            lived = await self._session(conn)
            if lived:
                self._reconnect.reset()
            if not self._stopping:
                await asyncio.sleep(self._reconnect.next())

    async def _session(self, conn: WebSocketClientConnection) -> bool:
        """Serve one connection until it closes; True if it lived (synced)."""
        self._conn, self._synced = conn, False
        self._resync.reset()
        self.connects.append(clock())
        self._queue = [s for s in self.sends if not s.done]  # resend everything unacked, in order
        self._inflight.clear()
        self._request_sync()
        self._pump()
        self._notify()
        try:
            while True:
                text = await conn.read_message()
                if text is None:
                    break
                if isinstance(text, str):
                    self._on_frame(json.loads(text))
        finally:
            self.closes.append(Close(clock(), conn.close_code, conn.close_reason))
            self._conn = None
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            self._inflight.clear()
            self._queue = []
            self._notify()
        return self._synced

    def _write(self, kind: str, data: dict[str, Any], request_id: str | None) -> bool:
        frame: dict[str, Any] = {"type": kind, "data": data}
        if request_id is not None:
            frame["id"] = request_id
        conn = self._conn
        if conn is None:
            return False
        try:
            written = conn.write_message(json.dumps(frame))
        except WebSocketClosedError:
            return False
        written.add_done_callback(lambda f: f.exception())  # a write to a closed stream: the read loop sees it
        return True

    def _request_sync(self) -> None:
        self._sync_id = f"sync-{next(self._request_ids)}"
        self._write("sync", {"cursors": self.cursors()}, self._sync_id)

    def _pump(self) -> None:
        """Send from the queue while the window has room."""
        while self._conn is not None and self._queue and len(self._inflight) < self.window:
            item = self._queue.pop(0)
            request_id = f"m{next(self._request_ids)}"
            data = {"conversation_id": item.conversation_id, "client_message_id": item.client_message_id}
            if item.ciphertext is not None:
                data["ciphertext"] = item.ciphertext
            now = clock()
            item.first_sent_at = item.first_sent_at or now
            item.last_sent_at = now
            item.attempts += 1
            self._inflight[request_id] = item
            if not self._write("message.send", data, request_id):
                return  # closed: the session's end requeues everything

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay, action))

    # -- frames from the server -------------------------------------------------
    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind, request_id, data = frame.get("type"), frame.get("id"), frame.get("data") or {}
        if request_id is not None and request_id == self._sync_id:
            self._on_sync_reply(kind, data)
        elif request_id is not None and request_id in self._inflight:
            item = self._inflight.pop(request_id)
            if kind == "ack":
                self._on_ack(item, data["message"], data.get("created"))
            else:
                self._on_send_error(item, data)
            self._pump()
        elif kind == "message.new":
            self._hold(data, pushed=True)
            if self.mark_delivered and data.get("sender_id") != self.user_id and data.get("id"):
                self._write("message.delivered", {"message_id": data["id"]}, f"d{next(self._request_ids)}")
        elif kind == "error" and request_id is None:
            self.error_codes[data.get("code", "?")] += 1
        else:
            self.events[kind or "?"] += 1
        self._notify()

    def _on_sync_reply(self, kind: str | None, data: dict[str, Any]) -> None:
        if kind == "ack":
            self._synced = True
            self.syncs.append(clock())
            return
        self.error_codes[data.get("code", "?")] += 1
        self._later(self._resync.next(), self._request_sync)

    def _on_ack(self, item: Send, message: dict[str, Any], created: bool | None) -> None:
        if item.acked_at is not None:  # acked before (a resend raced its own answer)
            if message["seq"] != item.seq:
                self.conflicts.append(f"{item.client_message_id}: acked as seq {item.seq} and {message['seq']}")
            return
        item.acked_at, item.seq, item.message_id, item.created = clock(), message["seq"], message["id"], created
        self._hold(message, pushed=False)

    def _on_send_error(self, item: Send, data: dict[str, Any]) -> None:
        code = data.get("code", "?")
        self.error_codes[code] += 1
        item.errors.append(code)
        if code in RESEND_ON_NEXT_CONNECTION:
            return  # the session's end requeues it
        if code not in RESEND_AFTER_BACKOFF:
            item.failed = code
            return
        item.backoff = item.backoff or Backoff(self.backoff_base, self.backoff_cap, self.rng)
        self._later(item.backoff.next(), lambda: self._resend(item))

    def _resend(self, item: Send) -> None:
        if item.done or item in self._queue or item in self._inflight.values():
            return
        bisect.insort(self._queue, item, key=lambda s: s.index)
        self._pump()

    def _hold(self, message: dict[str, Any], pushed: bool) -> None:
        """Keep a message (ours, acked, or someone's, pushed) by conversation and seq."""
        seqs = self.seen.setdefault(message["conversation_id"], {})
        message_id = None if message.get("tombstone") else message.get("id")
        held = seqs.get(message["seq"], "absent")
        if held == "absent":
            seqs[message["seq"]] = message_id
        elif held != message_id:
            self.conflicts.append(f"{message['conversation_id']} seq {message['seq']}: {held} and {message_id}")
        if pushed and message_id is not None:
            self.deliveries[message_id] += 1

    def _notify(self) -> None:
        self._changed.set()


def _describe(error: BaseException) -> str:
    if isinstance(error, HTTPClientError):
        return f"HTTP {error.code}"
    return f"{type(error).__name__}: {error}"[:200]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`, or None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


# -- what storage holds against what the clients sent -------------------------------------
Get = Callable[[str, str], Awaitable[Any]]  # (path, token) -> the JSON body of a 200


async def history(get: Get, token: str, conversation_id: str) -> list[dict[str, Any]]:
    """Every seq of a conversation, message or tombstone, in order."""
    out: list[dict[str, Any]] = []
    while True:
        after = out[-1]["seq"] if out else 0
        body = await get(f"/api/conversations/{conversation_id}/messages?after={after}&limit=200", token)
        out += body["messages"]
        if not body["has_more"]:
            return out


async def ledger(get: Get, tokens: list[str], conversations: list[str], clients: list[TrafficClient],
                 others: Iterable[TrafficClient] = ()) -> tuple[dict[str, int], list[str]]:
    """Storage against what the clients sent: `(counts, what went wrong)`. Conversation
    `i` is read with `tokens[i]`; its senders are `clients[2i]` and `clients[2i+1]`,
    plus the acked sends of `others` there (short-lived devices that may leave unacked).

    Counts: messages and tombstones stored; sends `lost` (acked or not, not in
    history) and `duplicated` (a client id stored twice); `holes` (seqs up to the
    conversation's last_seq that hold nothing, not even a tombstone); `strangers`
    (messages nobody sent); `ack_mismatches` (acked with a seq that history does
    not give it); `disordered_senders` (a sender whose seqs do not rise in send
    order); `conflicts` seen by the clients (one seq, two ids) and `failed` sends."""
    others = list(others)
    counts = Counter(messages=0, tombstones=0, lost=0, duplicated=0, holes=0, strangers=0, ack_mismatches=0,
                     disordered_senders=0, conflicts=0, failed=0)
    problems: list[str] = []
    for i, conversation_id in enumerate(conversations):
        last_seq = (await get(f"/api/conversations/{conversation_id}", tokens[i]))["conversation"]["last_seq"]
        messages = await history(get, tokens[i], conversation_id)
        seqs = [m["seq"] for m in messages]
        holes = sorted(set(range(1, last_seq + 1)) - set(seqs))
        real = [m for m in messages if not m.get("tombstone")]
        stored = Counter(m["client_message_id"] for m in real)
        sent = {s.client_message_id: s for c in clients[2 * i:2 * i + 2] for s in c.sends}
        visiting = {s.client_message_id: s for c in others for s in c.sends if s.conversation_id == conversation_id}
        lost = [cid for cid in sent if stored[cid] == 0]
        lost += [cid for cid, s in visiting.items() if s.acked_at is not None and stored[cid] == 0]
        duplicated = [cid for cid, n in stored.items() if n > 1]
        strangers = [cid for cid in stored if cid not in sent and cid not in visiting]
        seq_of = {m["client_message_id"]: m["seq"] for m in real}
        mismatched = [cid for cid, s in {**sent, **visiting}.items()
                      if s.seq is not None and cid in seq_of and s.seq != seq_of[cid]]
        counts.update(messages=len(real), tombstones=len(messages) - len(real), lost=len(lost),
                      duplicated=len(duplicated), holes=len(holes), strangers=len(strangers),
                      ack_mismatches=len(mismatched))
        for name, found in (("holes", holes), ("lost", lost), ("duplicated", duplicated),
                            ("strangers", strangers), ("ack seq differs", mismatched)):
            if found:
                problems.append(f"{conversation_id} {name}: {found[:10]}")
        if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
            problems.append(f"{conversation_id}: history not in ascending seq: {seqs}")
    for client in [*clients, *others]:
        seqs = [s.seq for s in client.sends if s.seq is not None]
        if seqs != sorted(seqs):
            counts["disordered_senders"] += 1
            problems.append(f"{client.name} sends numbered out of send order: {seqs}")
        counts.update(conflicts=len(client.conflicts), failed=sum(1 for s in client.sends if s.failed))
        problems += client.conflicts[:3] + [f"{client.name} {s.client_message_id} failed: {s.failed}"
                                           for s in client.sends if s.failed][:3]
    return dict(counts), problems
