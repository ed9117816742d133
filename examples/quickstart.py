#!/usr/bin/env python3
"""Kisse quick start over the WebSocket: alice sends bob a message live, bob
marks it read, alice sees the read receipt.

HTTP uses only the standard library (urllib); the WebSocket client is Tornado's
``websocket_connect`` (Tornado is already a Kisse dependency).

    python examples/quickstart.py --base-url http://localhost:8080

Exits 0 on success; on any failure or after --timeout seconds (default 10) it
prints ``FAILED: <reason>`` to stderr and exits 1.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from tornado.websocket import WebSocketClientConnection, websocket_connect


class QuickstartError(Exception):
    """A step failed; the message says which and why."""


def step(text: str) -> None:
    print(f"== {text}", flush=True)


class Api:
    """A minimal JSON-over-HTTP client for the Kisse REST API."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, token: str | None = None, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise QuickstartError(f"{method} {path} -> HTTP {error.code}: {error.read().decode(errors='replace')}")
        except (urllib.error.URLError, OSError) as error:
            raise QuickstartError(f"{method} {path}: cannot reach {self.base_url} ({error})")


class Socket:
    """One WebSocket connection with a helper to wait for a given frame."""

    def __init__(self, name: str, conn: WebSocketClientConnection, deadline: float) -> None:
        self.name, self.conn, self.deadline = name, conn, deadline

    def send(self, frame: dict) -> None:
        print(f"{self.name} -> {frame['type']} {json.dumps(frame['data'])}", flush=True)
        self.conn.write_message(json.dumps(frame))

    async def wait_for(self, frame_type: str, frame_id: str | None = None) -> dict:
        """Read frames until one of `frame_type` (and `frame_id`, if given) arrives.

        Other events (presence, conversation.new…) are skipped; an `error`
        reply to our request, a closed socket or the deadline raise.
        """
        wanted = f"{frame_type}" + (f" (id {frame_id})" if frame_id else "")
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise QuickstartError(f"{self.name}: timed out waiting for {wanted}")
            try:
                raw = await asyncio.wait_for(self.conn.read_message(), remaining)
            except asyncio.TimeoutError:
                raise QuickstartError(f"{self.name}: timed out waiting for {wanted}") from None
            if raw is None:
                raise QuickstartError(f"{self.name}: WebSocket closed (code {self.conn.close_code}) "
                                      f"while waiting for {wanted}")
            frame = json.loads(raw)
            if frame.get("type") == "error" and (frame_id is None or frame.get("id") == frame_id):
                raise QuickstartError(f"{self.name}: server error while waiting for {wanted}: {frame.get('data')}")
            if frame.get("type") == frame_type and (frame_id is None or frame.get("id") == frame_id):
                return frame


async def open_socket(name: str, base_url: str, token: str, deadline: float) -> Socket:
    parts = urllib.parse.urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    url = f"{scheme}://{parts.netloc}/ws?token={urllib.parse.quote(token)}"
    try:
        conn = await asyncio.wait_for(websocket_connect(url), max(deadline - time.monotonic(), 0.1))
    except asyncio.TimeoutError:
        raise QuickstartError(f"{name}: timed out connecting to {scheme}://{parts.netloc}/ws") from None
    except Exception as error:  # HTTPClientError (e.g. 401), connection refused…
        raise QuickstartError(f"{name}: cannot open {scheme}://{parts.netloc}/ws ({error})") from None
    print(f"{name}: WebSocket open", flush=True)
    return Socket(name, conn, deadline)


async def run(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    api = Api(base_url, timeout)
    suffix = f"{random.randrange(10**6):06d}{int(time.time()) % 10**6:06d}"
    password = "correct horse battery"

    step(f"0. server at {base_url}")
    print(api.call("GET", "/healthz")["status"])

    step("1. register alice and bob (REST)")
    users = {}
    for name in ("alice", "bob"):
        reply = api.call("POST", "/api/auth/register",
                         body={"username": f"{name}_{suffix}", "password": password})
        users[name] = reply
        print(f"{name}: username={reply['user']['username']} id={reply['user']['id']}")
    alice_token, bob_token = users["alice"]["token"], users["bob"]["token"]

    step("2. alice creates a direct conversation with bob (REST)")
    conversation = api.call("POST", "/api/conversations", alice_token,
                            {"participant_ids": [users["bob"]["user"]["id"]]})["conversation"]
    print(f"conversation id={conversation['id']} kind={conversation['kind']}")
    # For bob it is a message request until he accepts it (or replies): until then
    # alice sees none of his presence, typing or receipts, and cannot call him.
    accepted = api.call("POST", f"/api/conversations/{conversation['id']}/accept", bob_token, {})
    print(f"bob accepts the request: state={accepted['conversation']['membership']['state']}")

    step("3. both open the WebSocket and sync")
    alice = await open_socket("alice", base_url, alice_token, deadline)
    bob = await open_socket("bob", base_url, bob_token, deadline)
    try:
        for sock in (alice, bob):
            sock.send({"type": "sync", "id": "s1", "data": {}})
            ack = await sock.wait_for("ack", "s1")
            print(f"{sock.name} <- ack sync: {ack['data']['messages']} message(s) to catch up")

        step("4. alice sends a message over the WebSocket")
        client_message_id = str(uuid.uuid4())
        ciphertext = base64.b64encode(b"pretend this is encrypted").decode()
        alice.send({"type": "message.send", "id": "m1",
                    "data": {"conversation_id": conversation["id"], "client_message_id": client_message_id,
                             "ciphertext": ciphertext}})
        ack = await alice.wait_for("ack", "m1")
        sent = ack["data"]["message"]
        print(f"alice <- ack message.send: id={sent['id']} seq={sent['seq']} created={ack['data']['created']}")

        step("5. bob receives it live")
        new = (await bob.wait_for("message.new"))["data"]
        print(f"bob <- message.new: id={new['id']} seq={new['seq']} ciphertext={new['ciphertext']}")
        if new["id"] != sent["id"] or new["ciphertext"] != ciphertext:
            raise QuickstartError(f"bob received {new}, expected message {sent['id']} with {ciphertext}")

        step("6. bob marks it read; alice gets the receipt")
        bob.send({"type": "message.read", "id": "r1", "data": {"message_id": new["id"]}})
        ack = await bob.wait_for("ack", "r1")
        print(f"bob <- ack message.read: read_seq={ack['data']['receipt']['read_seq']}")
        receipt = (await alice.wait_for("message.receipt"))["data"]
        print(f"alice <- message.receipt: user_id={receipt['user_id']} "
              f"delivered_seq={receipt['delivered_seq']} read_seq={receipt['read_seq']}")
        if receipt["user_id"] != users["bob"]["user"]["id"] or receipt["read_seq"] < sent["seq"]:
            raise QuickstartError(f"unexpected receipt {receipt}")
    finally:
        alice.conn.close()
        bob.conn.close()

    print(f"OK: alice_{suffix} and bob_{suffix} exchanged a message over the WebSocket")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default=os.environ.get("BASE_URL", "http://localhost:8080"),
                        help="Kisse server URL (default: $BASE_URL or http://localhost:8080)")
    parser.add_argument("--timeout", type=float, default=10.0, help="give up after this many seconds (default 10)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(asyncio.wait_for(run(args.base_url, args.timeout), args.timeout + 1))
    except QuickstartError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"FAILED: timed out after {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
