"""Small helpers to talk to the app under test through HTTP and WebSocket."""
from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

_names = itertools.count()
# How long a test waits for a reply or an event that must come: generous, so a
# slow CI machine is never mistaken for a bug (waits for events that must *not*
# come are short and explicit).
WAIT = 20.0


class Api:
    """JSON over HTTP against one base URL."""

    def __init__(self, http_client: AsyncHTTPClient, base_url: str) -> None:
        self.http = http_client
        self.base_url = base_url
        self.tokens: dict[str, str] = {}  # user id -> the token register gave, to act as them

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None,
                   raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """`(status, parsed JSON or raw bytes)`; never raises on HTTP errors."""
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            raw = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        if raw is None and method in ("POST", "PUT", "PATCH"):
            raw = b""
        response = await self.http.fetch(HTTPRequest(self.base_url + path, method=method, body=raw,
                                                     headers=all_headers, request_timeout=60,
                                                     allow_nonstandard_methods=True),  # DELETE with a body
                                          raise_error=False)
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("application/json") and response.body:  # HEAD has none
            return response.code, json.loads(response.body)
        return response.code, response.body

    async def register(self, name: str | None = None, password: str = "password123") -> tuple[str, dict]:
        """A new user: `(token, user)`."""
        body = await self.register_full(name, password)
        return body["token"], body["user"]

    async def register_full(self, name: str | None = None, password: str = "password123", **extra: Any) -> dict:
        """A new user: the whole answer (tokens, device, user)."""
        name = name or f"user{next(_names)}"
        status, body = await self.call("POST", "/api/auth/register", body={"username": name, "password": password,
                                                                           **extra})
        assert status == 201, body
        self.tokens[body["user"]["id"]] = body["token"]
        return body

    async def login(self, name: str, password: str = "password123", **extra: Any) -> tuple[int, Any]:
        return await self.call("POST", "/api/auth/login", body={"username": name, "password": password, **extra})

    async def conversation(self, token: str, *others: dict, title: str | None = None, accepted: bool = True) -> dict:
        """A conversation of the token's user with `others`; by default every one of them
        accepts it at once (people who know each other), else it is a request for them."""
        status, body = await self.call("POST", "/api/conversations", token,
                                       {"participant_ids": [o["id"] for o in others], "title": title})
        assert status in (200, 201), body
        if accepted:
            for other in others:
                answer = await self.call("POST", f"/api/conversations/{body['conversation']['id']}/accept",
                                         self.tokens[other["id"]])
                assert answer[0] == 200, answer
        return body["conversation"]

    async def send(self, token: str, conversation_id: str, client_id: str, ciphertext: str | None = None) -> dict:
        status, body = await self.call("POST", "/api/messages", token,
                                       {"conversation_id": conversation_id, "client_message_id": client_id,
                                        "ciphertext": ciphertext})
        assert status in (200, 201), body
        return body["message"]


class Ws:
    """A WebSocket client that sorts frames into replies (by id) and events."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self._replies: dict[Any, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.closed = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, ws_url: str, token: str | None, **kwargs: Any) -> "Ws":
        url = ws_url + (f"?token={token}" if token else "")
        return cls(await websocket_connect(url, **kwargs))

    @classmethod
    async def connect_request(cls, request: HTTPRequest) -> "Ws":
        return cls(await websocket_connect(request))

    async def _read(self) -> None:
        while True:
            text = await self.conn.read_message()
            if text is None:
                if not self.closed.done():
                    self.closed.set_result(self.conn.close_code)
                return
            frame = json.loads(text)
            future = self._replies.pop(frame.get("id"), None) if "id" in frame else None
            if future is not None and not future.done():
                future.set_result(frame)
            else:
                await self.events.put(frame)

    async def request(self, kind: str, data: dict | None = None, timeout: float = WAIT) -> dict:
        """Send a request with a fresh id and wait for its reply frame."""
        request_id = f"r{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        self.conn.write_message(json.dumps({"type": kind, "id": request_id, "data": data or {}}))
        return await asyncio.wait_for(future, timeout)

    async def ok(self, kind: str, data: dict | None = None) -> dict:
        reply = await self.request(kind, data)
        assert reply["type"] in ("ack", "pong"), reply
        return reply["data"]

    async def event(self, kind: str | None = None, timeout: float = WAIT) -> dict:
        """The next event (of `kind`, skipping others)."""
        while True:
            frame = await asyncio.wait_for(self.events.get(), timeout)
            if kind is None or frame["type"] == kind:
                return frame

    async def no_event(self, kind: str, wait: float = 0.3) -> None:
        """Assert no event of `kind` arrives within `wait` seconds."""
        try:
            frame = await self.event(kind, timeout=wait)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected {kind}: {frame}")

    def close(self) -> None:
        self.conn.close()
        self._reader.cancel()


async def pair(api: Api, ws_url: str) -> tuple[tuple[str, dict, Ws], tuple[str, dict, Ws], dict]:
    """Two users sharing a conversation, each with one synced connection:
    `((token_a, user_a, ws_a), (token_b, user_b, ws_b), conversation)`."""
    ta, a = await api.register()
    tb, b = await api.register()
    conversation = await api.conversation(ta, b)
    wa, wb = await Ws.connect(ws_url, ta), await Ws.connect(ws_url, tb)
    await wa.ok("sync")
    await wb.ok("sync")
    return (ta, a, wa), (tb, b, wb), conversation
