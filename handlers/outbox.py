"""Batched WebSocket output: the frames queued for one connection during an
event-loop pass leave in a single stream write.

Tornado's `write_message` builds each frame with its own Task, future and
syscall. A chat relay sends several small frames per message (the event, the
sender's ack, receipts), so batching them is most of the server's output cost
(see benchmarks/README.md). One exception: a `message.new` is written at once
while the server is quiet (few connections waiting for a flush), so its
recipient can start on it while the server carries on; under load it is
batched like the rest. Frames are plain RFC 6455 server frames: FIN, text
opcode, unmasked, and uncompressed because Kisse never negotiates
permessage-deflate (ciphertext does not compress).
"""
from __future__ import annotations

import array
import asyncio
import fcntl
import struct
import termios

from tornado.iostream import IOStream, StreamClosedError

from kisse.hub import Hub

TEXT_FRAME = 0x81  # FIN + opcode 1
QUIET = 4  # below this many outboxes waiting for a flush, urgent frames go out at once
FLUSH_BYTES = 64 * 1024  # queued bytes that are written without waiting for the loop pass to end
STREAM_WINDOW = 256 * 1024  # most bytes handed to Tornado's stream and not yet to the kernel


def frame_header(size: int) -> bytes:
    if size < 126:
        return bytes((TEXT_FRAME, size))
    if size <= 0xFFFF:
        return struct.pack("!BBH", TEXT_FRAME, 126, size)
    return struct.pack("!BBQ", TEXT_FRAME, 127, size)


class Outbox:
    """Text frames waiting for the next flush, and the bytes not yet handed to the kernel.

    At most `STREAM_WINDOW` bytes sit in Tornado's stream buffer at a time; the
    rest waits here, where it can still be dropped, so that a close frame sent
    to a slow consumer is not stuck behind megabytes the peer will never read.
    """

    __slots__ = ("_stream", "_hub", "_loop", "_frames", "_queued", "_in_stream", "_scheduled", "_closed",
                 "_held_back", "_total", "_waiters", "written_bytes")

    def __init__(self, stream: IOStream, hub: Hub) -> None:
        self._stream = stream
        self._hub = hub  # keeps the app's count of outboxes waiting for a flush
        self._loop = asyncio.get_running_loop()
        self._frames: list[bytes] = []
        self._queued = 0  # bytes in _frames
        self._in_stream = 0  # bytes handed to the stream, not yet to the kernel
        self._scheduled = False
        self._closed = False
        self._held_back = False  # a flush waits for room in the window
        self._total = 0  # bytes ever queued: write_now's waiters wait for an offset
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.written_bytes = 0  # handed to the kernel so far: it grows while the peer reads

    @property
    def unsent_bytes(self) -> int:
        """Queued here or still in the stream's buffer."""
        return self._queued + self._in_stream

    def put(self, payload: bytes, urgent: bool = False) -> None:
        """Queue one text frame (`payload` is its UTF-8 JSON) for the end of this loop pass.
        An urgent one is written at once if the server is quiet."""
        if not self._queue(payload):
            return
        if urgent and self._hub.flushes_waiting < QUIET:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._hub.flushes_waiting += 1
            self._loop.call_soon(self._scheduled_flush)

    def write_now(self, payload: bytes) -> asyncio.Future[None] | None:
        """Write this frame (after those queued) as soon as the window allows; the
        future resolves once the kernel has it, whatever its size."""
        if not self._queue(payload, flush_when_full=False):
            return None
        waiter = self._loop.create_future()
        self._waiters.append((self._total, waiter))
        self.flush()
        return waiter

    def flush(self, whole: bool = False) -> None:
        """Write the queued frames now if the window has room (`whole`: all of them
        regardless, before a close frame)."""
        if self._closed or self._stream.closed():
            self._drop()
            return
        if not self._frames:
            return
        if self._in_stream >= STREAM_WINDOW and not whole:
            self._held_back = True  # resumed when the stream has written some
            return
        data = b"".join(self._frames)
        self._frames.clear()
        self._queued = 0
        self._in_stream += len(data)
        try:
            future = self._stream.write(data)
        except StreamClosedError:
            self._drop()
            return
        if future.done():  # the usual case: the kernel took it all at once
            self._wrote(len(data))
        else:
            future.add_done_callback(lambda _, size=len(data): self._wrote(size))

    def progress(self) -> int:
        """Bytes of ours the peer has taken, roughly: handed to the kernel, minus
        what the kernel still holds unacknowledged (Linux tells, via SIOCOUTQ;
        elsewhere only the first part counts). Control frames the connection writes
        itself (pings) blur it by a few bytes, so compare with some slack."""
        try:
            unacked = array.array("i", [0])
            fcntl.ioctl(self._stream.socket.fileno(), termios.TIOCOUTQ, unacked)
        except (OSError, AttributeError, ValueError):
            return self.written_bytes
        return self.written_bytes - unacked[0]

    def close(self) -> None:
        """Drop what is queued and refuse more: the close frame is the last one."""
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        self._frames.clear()
        self._queued = 0
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # its writer sees the connection closing
        self._waiters.clear()

    def _queue(self, payload: bytes, flush_when_full: bool = True) -> bool:
        if self._closed:
            return False
        header = frame_header(len(payload))
        size = len(header) + len(payload)
        self._frames.append(header)
        self._frames.append(payload)
        self._queued += size
        self._total += size
        if flush_when_full and self._queued >= FLUSH_BYTES:
            self.flush()
        return True

    def _scheduled_flush(self) -> None:
        self._scheduled = False
        self._hub.flushes_waiting -= 1
        self.flush()

    def _wrote(self, size: int) -> None:
        self._in_stream -= size
        self.written_bytes += size
        while self._waiters and self._waiters[0][0] <= self.written_bytes:
            _, waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
        if self._held_back and self._in_stream < STREAM_WINDOW:
            self._held_back = False
            self.flush()
