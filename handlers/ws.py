"""`/ws`: one WebSocket per device for live events, receipts, typing, presence,
call signalling and catch-up. Each request type maps to one service call."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.httputil
import tornado.web
import tornado.websocket

from handlers.base import bearer_token, render_error, secure_headers
from handlers.catchup import CatchUp
from handlers.lanes import Lanes, lane_of
from handlers.outbox import Outbox
from kisse import calls, keys, messaging, presence, protocol, sessions
from kisse.addresses import client_ip
from kisse.errors import BadRequest, KisseError, PayloadTooLarge, RateLimited, Unauthorized, client_error
from kisse.logs import new_request_id
from kisse.runtime import Runtime
from storage.base import new_id

log = logging.getLogger("kisse.ws")

# Bytes the peer must take in an interval for that to count as a sign of life:
# more than the pings and pongs of one interval can account for.
PROGRESS_SLACK = 512
# What a client at a cap of open connections is told to wait before trying again.
OPEN_CAP_RETRY = 10

Action = Callable[["GatewaySocket", dict[str, Any]], Awaitable[Any]]


class StrictTextProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado drops a text frame that is not UTF-8 by cutting the connection
    (the client sees 1006); RFC 6455 asks for close code 1007."""

    def _handle_message(self, opcode: int, data: bytes) -> asyncio.Future[None] | None:
        if opcode == 0x1 and not self.client_terminated:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(protocol.CLOSE_INVALID_TEXT, "text frame is not UTF-8")
                return None
        return super()._handle_message(opcode, data)


class GatewaySocket(tornado.websocket.WebSocketHandler):
    """One client device's connection."""

    conn_id: str
    user_id: str
    device_id: int
    session_id: str
    rt: Runtime

    def initialize(self) -> None:
        self.rt = self.application.settings["kisse"]

    def check_origin(self, origin: str) -> bool:
        return True  # mobile clients and tokens, not cookies: no CSRF to guard against

    async def prepare(self) -> None:
        new_request_id(self.request.headers.get("X-Request-ID"))
        try:
            token = self.get_query_argument("token", None) or bearer_token(self.request)
        except tornado.web.HTTPError:  # not UTF-8: Tornado's own message would quote the token back
            raise Unauthorized("invalid token", code="invalid_token") from None
        # The socket belongs to the device session, not to the access token it
        # opened with: it stays open when that token expires, and closes (4003)
        # when the session is revoked.
        identity = await sessions.authenticate(self.rt, token)
        self.user_id, self.device_id, self.session_id = identity.user_id, identity.device_id, identity.session_id
        self.client_ip = client_ip(self.request, self.rt.settings.trusted_proxies)
        await self._admit()
        self.conn_id = new_id()

    async def _admit(self) -> None:
        """429 for one connection too many: opened too often, or too many open on this node."""
        rt = self.rt
        if not rt.limits.enabled:
            return
        await rt.limits.spend(("ws_user", (self.user_id,)), ("ws_ip", (self.client_ip,)))
        if len(rt.hub.connections(self.user_id)) >= rt.settings.max_ws_per_user:
            raise RateLimited(f"this account holds {rt.settings.max_ws_per_user} connections open here: close some",
                              details={"retry_after": OPEN_CAP_RETRY})
        if rt.hub.count_from(self.client_ip) >= rt.settings.max_ws_per_ip:
            raise RateLimited(f"this address holds {rt.settings.max_ws_per_ip} connections open here: close some",
                              details={"retry_after": OPEN_CAP_RETRY})

    def set_default_headers(self) -> None:
        secure_headers(self)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        render_error(self, status_code, kwargs.get("exc_info"), self.rt.storage)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Tornado's default would log the request URI, and ours carries ?token=.
        if isinstance(value, (KisseError, *self.rt.storage.unavailable_errors)) or \
                (isinstance(value, tornado.web.HTTPError) and value.status_code < 500):
            return  # a client's mistake (e.g. ?token=%ff is not UTF-8): answered, not logged
        log.error("websocket handshake failed", exc_info=(typ, value, tb), extra={"path": self.request.path})

    # -- lifecycle ---------------------------------------------------------
    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        return None if protocol is None else StrictTextProtocol(self, False, protocol.params)

    def get_compression_options(self) -> None:
        return None  # the Outbox writes uncompressed frames; ciphertext doesn't compress anyway

    def open(self, *args: Any, **kwargs: Any) -> None:
        assert self.ws_connection is not None
        if self.ws_connection.stream.closed():
            # The client gave up during a slow handshake: Tornado still opens the
            # socket, but nobody must count it (metrics, presence) or write to it.
            self.ws_connection._abort()
            return
        self._outbox = Outbox(self.ws_connection.stream, self.rt.hub)
        self._closing = False
        self._draining = False
        self._lanes = Lanes(self._handle, protocol.MAX_WAITING_REQUESTS)
        self._catchup = CatchUp(self.rt.settings.ws_queue_bytes)
        self.set_nodelay(True)
        # The handshake's headers and query (with ?token=) serve no one once open:
        # without them an idle connection holds about 2 KB less (tracemalloc).
        self.request.headers = tornado.httputil.HTTPHeaders()
        self.request.arguments, self.request.query_arguments = {}, {}
        self.request.uri, self.request.query = self.request.path, ""
        loop = asyncio.get_running_loop()
        self._answered = True
        self._frames, self._frames_until = 0, 0.0
        # KISSE_RATE_LIMITS=off: no cap a load test could reach.
        self._frame_rate = self.rt.settings.ws_frame_rate if self.rt.limits.enabled else 2**62
        self._paused = self._paused_since_ping = False
        self._progress = self._outbox.progress()
        self._beat_slot = self.rt.heartbeat.add(self)
        self._sync_grace = loop.call_later(self.rt.settings.ws_sync_grace, self._end_sync_grace)
        self.rt.hub.add(self)

    def beat(self, late: bool) -> None:
        """Once per interval (kisse/heartbeat.py): a peer that showed no sign of
        life since the last ping is dropped, so a dead one goes within two
        intervals; then ping.

        Signs of life: a pong, any frame, or the peer taking our data (a client
        busy reading a long catch-up may not have reached the ping yet: it waits
        behind that data, in our buffers and the kernel's).
        Only time the server spent reading counts against the peer: while the
        inbox is full Tornado reads nothing (its pongs wait in the kernel), and
        a loop that woke up `late` was not reading either. Such an interval
        gives no verdict; the next one judges afresh.
        """
        progress = self._outbox.progress()
        moving, self._progress = progress > self._progress + PROGRESS_SLACK, progress
        fair = not self._paused and not self._paused_since_ping and not late
        if fair and not self._answered and not moving:
            self.close(protocol.CLOSE_PING_TIMEOUT, "ping timed out")
            return
        self._answered = False
        self._paused_since_ping = self._paused
        try:
            self.ping()
        except tornado.websocket.WebSocketClosedError:
            return

    def on_pong(self, data: bytes) -> None:
        self._answered = True

    def on_ping(self, data: bytes) -> None:
        self._answered = True  # any frame from the peer is a sign of life

    def _pause_reading(self, room: asyncio.Future[None]) -> asyncio.Future[None]:
        """Backpressure: Tornado stops reading until a request has finished."""
        self._paused = self._paused_since_ping = True
        room.add_done_callback(self._resume_reading)
        return room

    def _resume_reading(self, _: asyncio.Future[None]) -> None:
        self._paused = False

    def on_close(self) -> None:
        self._closing = True
        if hasattr(self, "_lanes"):
            self._lanes.close()  # requests not started yet die with the connection
        if hasattr(self, "_beat_slot"):
            self.rt.heartbeat.discard(self, self._beat_slot)
            self._sync_grace.cancel()
            self.rt.hub.remove(self)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        connection = self.ws_connection
        if hasattr(self, "_outbox"):
            if code not in (protocol.CLOSE_PING_TIMEOUT, protocol.CLOSE_SLOW_CONSUMER):
                self._outbox.flush(whole=True)  # what was queued goes before the close frame
            self._outbox.close()  # a slow consumer's backlog is dropped, so the close frame reaches it
        self._closing = True
        super().close(code, reason)
        if connection is None:
            return
        if code == protocol.CLOSE_PING_TIMEOUT:
            # A dead peer won't answer a close handshake: drop the socket now, not in 5 s.
            connection._abort()
        elif code == protocol.CLOSE_SLOW_CONSUMER:
            # Nothing more is routed to it; but it reads, slowly: give it time to
            # reach the close frame before letting go of the socket.
            self.rt.hub.remove(self)
            asyncio.get_running_loop().call_later(self.rt.settings.ws_ping, connection._abort)

    # -- outbound ------------------------------------------------------------
    def push(self, event_type: str, data: dict[str, Any], frame: bytes) -> None:
        """Queue an event; drop the client if it has stopped reading."""
        self.rt.metrics.frames.count("out", event_type)
        if event_type == "message.new":
            if not self._catchup.offer(data, frame):
                self._send(frame, urgent=True)
            return
        self._send(frame)

    def _send(self, frame: bytes, urgent: bool = False) -> None:
        if self._closing or self.ws_connection is None:
            return
        if self._outbox.unsent_bytes > self.rt.settings.ws_queue_bytes:
            log.warning("closing slow consumer", extra={"user_id": self.user_id})
            self._closing = True
            self.close(protocol.CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        self._outbox.put(frame, urgent)

    def reply(self, kind: str, data: dict[str, Any], request_id: Any) -> None:
        self._send(protocol.encode(kind, data, request_id))

    # -- inbound ---------------------------------------------------------------
    def on_message(self, message: str | bytes) -> asyncio.Future[None] | None:
        """Handle the frame in its lane (handlers/lanes.py): in order with the
        requests it depends on, never behind unrelated ones. With
        protocol.MAX_WAITING_REQUESTS running or waiting, Tornado stops reading
        until one is done: a client cannot queue unbounded work."""
        self._answered = True
        now = time.monotonic()
        if now >= self._frames_until:  # a fixed one-second window: per connection, nothing to share
            self._frames_until, self._frames = now + 1.0, 0
        self._frames += 1
        try:
            kind, request_id, data = protocol.parse(message)
        except protocol.FrameError as error:
            self.reply("error", error.to_dict(), error.request_id)
            return None
        if self._frames > self._frame_rate:
            if self._frames > 2 * self._frame_rate:
                self.close(protocol.CLOSE_POLICY, "too many frames: slow down when told rate_limited")
                return None
            retry_after = max(1, math.ceil(self._frames_until - now))
            self.rt.metrics.rate_limited.labels("ws_frames").inc()
            self.reply("error", {"code": "rate_limited", "message": f"more than {self._frame_rate} frames a second: "
                                 f"retry in {retry_after} s", "details": {"retry_after": retry_after}}, request_id)
            return None
        self.rt.metrics.frames.count("in", kind)
        if self._draining:  # shutting down: taken by no one, so safe to send again elsewhere
            self.reply("error", {"code": "shutting_down", "message": "server is shutting down: "
                                 "reconnect and send it again", "details": {"retry_after": 1}}, request_id)
            return None
        room = self._lanes.submit(lane_of(kind, data), (kind, request_id, data))
        return None if room is None else self._pause_reading(room)

    async def _handle(self, request: tuple[str, Any, dict[str, Any]]) -> None:
        kind, request_id, data = request
        new_request_id()  # one id per frame
        try:
            result = await ACTIONS[kind](self, data)
            if kind == "ping":
                self.reply("pong", result, request_id)
            elif request_id is not None:
                self.reply("ack", result, request_id)
        except Exception as exc:
            error = client_error(exc, self.rt.storage.unavailable_errors)
            if error.status >= 500 and error.code == "internal_error":
                log.exception("websocket request failed")
            self.reply("error", error.to_dict(), request_id)

    async def drain(self) -> None:
        """Take no more requests; return once those taken are answered."""
        self._draining = True
        await self._lanes.idle()

    async def sync(self, cursors: dict[str, int]) -> dict[str, Any]:
        """Send every message missed since the client's cursors, then go live
        (handlers/catchup.py: no gap and no duplicate at the seam)."""
        self._sync_grace.cancel()
        view = await messaging.visible_to(self.rt, self.user_id)
        covered, held, expired = await self._catchup.run(self.rt.storage, self.user_id, cursors, self._send_now, view)
        for frame in held:
            self._send(frame, urgent=True)
        await keys.tell_if_low(self.rt, self.user_id, self.session_id, conn_id=self.conn_id)  # a missed keys.low
        return {"messages": covered, "expired": expired}

    def _end_sync_grace(self) -> None:
        """A client that has not synced yet gets its held live messages now."""
        if self._catchup.holding and not self._closing:
            for frame in self._catchup.release():
                self._send(frame, urgent=True)

    async def _send_now(self, message: dict[str, Any]) -> bool:
        """Write a catch-up message and wait for the socket to take it: catch-up is
        paced by the client's reading. False once the connection is gone."""
        if self._closing:
            return False
        self.rt.metrics.frames.count("out", "message.new")
        written = self._outbox.write_now(protocol.encode("message.new", message))
        if written is not None:
            await written
        return not self._closing


async def _ping(socket: GatewaySocket, data: dict[str, Any]) -> dict[str, Any]:
    return {"time": time.time()}


async def _sync(socket: GatewaySocket, data: dict[str, Any]) -> dict[str, Any]:
    return await socket.sync(data.get("cursors", {}))


async def _send(socket: GatewaySocket, data: dict[str, Any]) -> dict[str, Any]:
    view, created = await messaging.send_message(
        socket.rt, socket.user_id, data["conversation_id"], data["client_message_id"],
        data.get("ciphertext"), origin_conn=socket.conn_id)
    return {"message": view, "created": created}


def _signal(kind: str) -> Action:
    async def action(socket: GatewaySocket, data: dict[str, Any]) -> Any:
        return await calls.relay(socket.rt, socket.user_id, socket.conn_id, data["call_id"], kind, data["payload"])
    return action


async def _hangup(socket: GatewaySocket, data: dict[str, Any]) -> Any:
    relayed = False
    if "payload" in data:  # a last word for the peer (e.g. a reason), sent while the call is live
        try:
            await calls.relay(socket.rt, socket.user_id, socket.conn_id, data["call_id"], "call.hangup",
                              data["payload"])
            relayed = True
        except (BadRequest, PayloadTooLarge):
            pass  # a bad last word never keeps a call alive: it is dropped, the call still ends
    return {"call": await calls.hang_up(socket.rt, socket.user_id, data["call_id"]), "payload_relayed": relayed}


async def _typing(socket: GatewaySocket, data: dict[str, Any], start: bool) -> Any:
    tracker = socket.rt.typing
    if start:
        return await tracker.start(socket.user_id, socket.conn_id, data["conversation_id"])
    return await tracker.stop(socket.user_id, data["conversation_id"])


def _call_action(fn: Callable[..., Awaitable[dict[str, Any]]], with_conn: bool = False) -> Action:
    async def action(socket: GatewaySocket, data: dict[str, Any]) -> Any:
        extra = {"origin_conn": socket.conn_id} if with_conn else {}
        return {"call": await fn(socket.rt, socket.user_id, data["call_id"], **extra)}
    return action


async def _call_start(socket: GatewaySocket, data: dict[str, Any]) -> Any:
    return {"call": await calls.start_call(socket.rt, socket.user_id, data["callee_id"], data["media"],
                                           origin_conn=socket.conn_id)}


async def _presence(socket: GatewaySocket, data: dict[str, Any]) -> Any:
    return {"presence": await presence.set_status(socket.rt, socket.user_id, data.get("status"),
                                                  data.get("show_last_seen"))}


async def _receipt(socket: GatewaySocket, data: dict[str, Any], kind: str) -> Any:
    return {"receipt": await messaging.mark(socket.rt, socket.user_id, data["message_id"], kind,
                                            origin_conn=socket.conn_id)}


ACTIONS: dict[str, Action] = {
    "ping": _ping,
    "sync": _sync,
    "message.send": _send,
    "message.delivered": lambda s, d: _receipt(s, d, "delivered"),
    "message.read": lambda s, d: _receipt(s, d, "read"),
    "typing.start": lambda s, d: _typing(s, d, True),
    "typing.stop": lambda s, d: _typing(s, d, False),
    "presence.set": _presence,
    "call.start": _call_start,
    "call.accept": _call_action(calls.accept, with_conn=True),
    "call.reject": _call_action(calls.reject),
    "call.cancel": _call_action(calls.cancel),
    "call.end": _call_action(calls.end),
    "call.offer": _signal("call.offer"),
    "call.answer": _signal("call.answer"),
    "call.ice": _signal("call.ice"),
    "call.hangup": _hangup,
}
assert set(ACTIONS) == set(protocol.REQUESTS), "every request type needs an action"

routes = [(r"/ws", GatewaySocket)]
