"""A bare-bones WebSocket client for tests that need control over reading:
a client that reads slowly, stops reading, or writes bytes no library would."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from typing import Any

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


class RawWs:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, token: str, receive_buffer: int | None = None) -> "RawWs":
        sock = socket.socket()
        if receive_buffer:  # small, so the server feels it when we read slowly
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # A small reader buffer too: asyncio reads ahead up to twice its limit, and a
        # slow reader must not hide megabytes (and the server's pings) in it.
        reader, writer = await asyncio.open_connection(sock=sock, limit=receive_buffer or 1 << 20)
        writer.write((f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert response.startswith(b"HTTP/1.1 101"), response
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """One masked client frame (RFC 6455 requires clients to mask)."""
        mask = os.urandom(4)
        size = len(payload)
        head = bytes((0x80 | opcode,))
        if size < 126:
            head += bytes((0x80 | size,))
        elif size < 1 << 16:
            head += struct.pack("!BH", 0x80 | 126, size)
        else:
            head += struct.pack("!BQ", 0x80 | 127, size)
        # XOR as one big integer: a byte loop took 40 ms for a 300 KB frame, which
        # timing tests would have charged to the server.
        key = (mask * (size // 4 + 1))[:size]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
        self.writer.write(head + mask + masked)

    def send(self, kind: str, data: dict[str, Any] | None = None, request_id: Any = None) -> None:
        frame: dict[str, Any] = {"type": kind, "data": data or {}}
        if request_id is not None:
            frame["id"] = request_id
        self.send_frame(TEXT, json.dumps(frame).encode())

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame, `(opcode, payload)`; pings are answered on the way."""
        while True:
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(size)
            opcode = first & 0x0F
            if opcode == PING:
                self.send_frame(PONG, payload)
                continue
            if opcode == CLOSE and len(payload) >= 2:
                self.close_code = struct.unpack("!H", payload[:2])[0]
            return opcode, payload

    async def json(self) -> dict[str, Any]:
        """The next text frame, parsed; raises ConnectionError on a close frame."""
        opcode, payload = await self.frame()
        if opcode == CLOSE:
            raise ConnectionError(f"closed with {self.close_code}")
        return json.loads(payload)

    async def reply(self, request_id: Any, timeout: float = 20.0) -> dict[str, Any]:
        """The reply to `request_id`, skipping events on the way."""
        while True:
            frame = await asyncio.wait_for(self.json(), timeout)
            if frame.get("id") == request_id and frame["type"] in ("ack", "pong", "error"):
                return frame

    def close(self) -> None:
        self.writer.close()
