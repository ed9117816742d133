"""The relay load generator on picows (a Cython WebSocket client driven by callbacks).

A frame costs this client a few microseconds, several times less than aiohttp,
which matters on a 2-vCPU machine where every client cycle is taken from the
server (see README, "Is the client the bottleneck?"). Same protocol and load
model as `load.relay`: per pair, at most `window` messages in flight; B's
receipt of a message frees a slot and A sends the next one.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

perf = time.perf_counter


class Side(WSListener):
    """One client connection; `on_text` is set by the pair that owns it."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.kisse = True
        self.errors: list[str] = []
        self.receipts = 0  # message.receipt frames (the sender's side of the loop)
        self.last_receipt: str | None = None
        self.on_text = self._sync_wait

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # Small frames back to back: never let Nagle hold one for the peer's delayed ACK.
        sock = transport.underlying_transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.kisse:
            transport.send(WSMsgType.TEXT, b'{"type":"sync","id":"s","data":{}}')
        elif not self.synced.done():
            self.synced.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.on_text(frame.get_payload_as_utf8_text())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.synced.done():
            self.synced.set_exception(ConnectionError("disconnected before sync"))

    def _sync_wait(self, text: str) -> None:
        if text.startswith('{"type":"ack","id":"s"') and not self.synced.done():
            self.synced.set_result(None)
        elif '"type":"error"' in text:
            self.errors.append(text[:300])

    def drain(self, text: str) -> None:
        if text.startswith('{"type":"message.receipt"'):
            self.receipts += 1
            self.last_receipt = text
        elif text.startswith('{"type":"error"'):
            self.errors.append(text[:300])


async def connect(url: str, kisse: bool) -> Side:
    def factory() -> Side:
        side = Side()
        side.kisse = kisse
        return side
    _, side = await ws_connect(factory, url, websocket_handshake_timeout=30, max_frame_size=1 << 24)
    await asyncio.wait_for(side.synced, 30)
    return side


class Pair:
    def __init__(self, index: int, a: Side, b: Side, conversation_id: str, ciphertext: str, kisse: bool,
                 window: int, max_messages: int, deliveries: list[tuple[float, float]]) -> None:
        self.index, self.a, self.b, self.kisse = index, a, b, kisse
        self.window, self.max_messages = window, max_messages
        self.prefix = ('{"type":"message.send","id":%%d,"data":{"conversation_id":"%s",'
                       '"client_message_id":"p%d-%%d","ciphertext":"%s"}}' % (conversation_id, index, ciphertext))
        self.sent_at: dict[str, float] = {}
        self.next = 0
        self.received = 0
        self.last_seq = 0  # of the last message B got
        self.deliveries = deliveries
        self.stopped = False
        a.on_text = a.drain
        b.on_text = self.on_b

    def start(self) -> None:
        for _ in range(self.window):
            self.send()

    def send(self) -> None:
        if self.stopped or self.next >= self.max_messages or self.a.transport is None:
            return
        k = self.next
        self.next += 1
        self.sent_at[f"p{self.index}-{k}"] = perf()
        self.a.transport.send(WSMsgType.TEXT, (self.prefix % (k, k)).encode())

    def on_b(self, text: str) -> None:
        if text.startswith('{"type":"message.new"') or (not self.kisse and text.startswith('{"type":"message.send"')):
            now = perf()
            data = json.loads(text)["data"]
            t0 = self.sent_at.pop(data["client_message_id"], None)
            if t0 is not None:
                self.deliveries.append((now, now - t0))
            self.received += 1
            self.last_seq = data.get("seq", 0)
            assert self.b.transport is not None
            self.b.transport.send(WSMsgType.TEXT, b'{"type":"message.delivered","id":%d,"data":{"message_id":"%s"}}'
                                  % (self.received, data.get("id", data["client_message_id"]).encode()))
            self.send()
        elif text.startswith('{"type":"error"'):
            self.b.errors.append(text[:300])


async def run(p: dict[str, Any], sockets: list[tuple[str, str, str]], ciphertext: str,
              meter_factory: Any) -> dict[str, Any]:
    """`sockets`: (url A, url B, conversation id) per pair."""
    kind = p["target"]
    kisse = kind == "kisse"
    sides = []
    for url_a, url_b, conversation_id in sockets:
        sides.append((await connect(url_a, kisse), await connect(url_b, kisse), conversation_id))
    deliveries: list[tuple[float, float]] = []
    per_pair = max(1, p["max_messages"] // len(sides))
    pairs = [Pair(i, a, b, c, ciphertext, kisse, p["window"], per_pair, deliveries)
             for i, (a, b, c) in enumerate(sides)]
    for pair in pairs:
        pair.start()
    await asyncio.sleep(p["warmup"])
    meter = meter_factory()
    meter.start()
    t_start = perf()
    done_at = t_start + p["duration"]
    while perf() < done_at and any(pair.next < pair.max_messages for pair in pairs):
        await asyncio.sleep(0.05)
    t_end = perf()
    cpu = meter.stop()
    for pair in pairs:
        pair.stopped = True
    await asyncio.sleep(0.5)
    for a, b, _ in sides:
        for side in (a, b):
            if side.transport is not None:
                side.transport.send_close()
                side.transport.disconnect()
    errors = [e for a, b, _ in sides for e in (*a.errors, *b.errors)]
    return {"t_start": t_start, "t_end": t_end, "deliveries": deliveries, "cpu": cpu, "errors": errors,
            "receipts": sum(a.receipts for a, _, _ in sides)}
