"""Batched WebSocket output: the frames queued for one connection during an
event-loop pass leave in a single stream write.

Tornado's `write_message` builds each frame with its own Task, future and
syscall. A chat relay sends several small frames per message (the event, the
sender's ack, receipts), so batching them is most of the server's output cost
(see benchmarks/README.md). Frames are plain RFC 6455 server frames: FIN,
text opcode, unmasked, and uncompressed because Kisse never negotiates
permessage-deflate (ciphertext does not compress).
"""
from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from tornado.iostream import IOStream, StreamClosedError

TEXT_FRAME = 0x81  # FIN + opcode 1
QUIET = 4


def frame_header(size: int) -> bytes:
    if size < 126:
        return bytes((TEXT_FRAME, size))
    if size <= 0xFFFF:
        return struct.pack("!BBH", TEXT_FRAME, 126, size)
    return struct.pack("!BBQ", TEXT_FRAME, 127, size)


class Outbox:
    """Text frames waiting for the next flush, and the bytes not yet handed to the kernel."""

    __slots__ = ("_stream", "_frames", "_loop", "unsent_bytes")  # one per connection

    # Outboxes (all connections) with a flush scheduled for this loop pass: a
    # measure of how busy the server is right now.
    waiting = 0

    def __init__(self, stream: IOStream) -> None:
        self._stream = stream
        self._frames: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self.unsent_bytes = 0  # queued here or still in the stream's buffer

    def put(self, payload: bytes, urgent: bool = False) -> None:
        """Queue one text frame (`payload` is its UTF-8 JSON). An urgent one is written
        at once when the server is quiet, so its reader can start on it meanwhile."""
        header = frame_header(len(payload))
        self.unsent_bytes += len(header) + len(payload)
        self._frames.append(header)
        self._frames.append(payload)
        if urgent and Outbox.waiting < QUIET:
            self.flush()
        elif len(self._frames) == 2:
            Outbox.waiting += 1
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        Outbox.waiting -= 1
        self.flush()

    def flush(self) -> asyncio.Future[None] | None:
        """Write every queued frame now; the future resolves once the kernel has them."""
        if not self._frames or self._stream.closed():
            self._frames.clear()
            return None
        data = b"".join(self._frames)
        self._frames.clear()
        try:
            future = self._stream.write(data)
        except StreamClosedError:
            return None
        if future.done():  # the usual case: the kernel took it all at once
            self.unsent_bytes -= len(data)
        else:
            future.add_done_callback(self._written(len(data)))
        return future

    def _written(self, size: int) -> Callable[[asyncio.Future[None]], None]:
        def done(_: asyncio.Future[None]) -> None:
            self.unsent_bytes -= size
        return done
