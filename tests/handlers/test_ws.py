"""The WebSocket gateway, with real clients against a listening server."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import jwt
import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest

from tests.client import WAIT, Ws, pair
from tests.rawws import RawWs
from tests.conftest import TEST_SETTINGS, with_settings

pytestmark = pytest.mark.gen_test


async def test_handshake_refusals_are_401_without_upgrade(api, ws_url):
    token, user = await api.register()
    now = int(time.time())
    expired = jwt.encode({"sub": user["id"], "iat": now - 100, "exp": now - 50, "jti": "j"},
                         TEST_SETTINGS.jwt_secret, algorithm="HS256")
    for bad in (None, "forged.token.value", expired):
        with pytest.raises(HTTPClientError) as refused:
            await Ws.connect(ws_url, bad)
        assert refused.value.code == 401
    # The Authorization header works as well as ?token=.
    ws = await Ws.connect_request(HTTPRequest(ws_url, headers={"Authorization": f"Bearer {token}"}))
    assert (await ws.request("ping"))["type"] == "pong"
    ws.close()


async def test_bad_frames_get_error_frames_and_the_connection_stays(api, ws_url):
    token, _ = await api.register()
    ws = await Ws.connect(ws_url, token)
    ws.conn.write_message("{not json")
    assert (await ws.event("error"))["data"]["code"] == "malformed_json"
    ws.conn.write_message(json.dumps({"type": "no.such", "id": 7, "data": {}}))
    frame = await ws.event("error")
    assert frame["id"] == 7 and frame["data"]["code"] == "unknown_type"
    reply = await ws.request("message.send", {"conversation_id": 5, "client_message_id": "x"})
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_field"
    reply = await ws.request("message.send", {"conversation_id": "c"})
    assert reply["type"] == "error" and reply["data"]["code"] == "missing_fields"
    reply = await ws.request("message.send", {"conversation_id": "0" * 24, "client_message_id": "x"})
    assert reply["type"] == "error" and reply["data"]["code"] == "conversation_not_found"
    for bad_id in ("1.5", "2.0", "123456789012345678901234567890"):  # only strings and 64-bit integers
        ws.conn.write_message('{"type": "ping", "id": %s}' % bad_id)
        frame = await ws.event("error")
        assert frame["data"]["code"] == "invalid_field" and "id" not in frame
    ws.conn.write_message('{"type": "ping", "data": {"s": "\\ud800"}}')  # a lone surrogate is not text
    assert (await ws.event("error"))["data"]["code"] == "malformed_json"
    ws.conn.write_message(b"\x00binary", binary=True)
    assert (await ws.event("error"))["data"]["code"] == "binary_frame"
    assert (await ws.request("ping"))["type"] == "pong"
    ws.close()


@pytest.mark.parametrize("settings", [with_settings(max_ws_frame=1024)], ids=["frame=1KiB"])
async def test_oversized_frame_closes_with_1009(api, ws_url):
    token, _ = await api.register()
    ws = await Ws.connect(ws_url, token)
    ws.conn.write_message(json.dumps({"type": "ping", "data": {"pad": "x" * 2000}}))
    assert await asyncio.wait_for(ws.closed, WAIT) == 1009


async def test_message_fans_out_to_every_device_and_transport(api, ws_url):
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    wb2 = await Ws.connect(ws_url, tb)
    await wb2.ok("sync")
    wa2 = await Ws.connect(ws_url, ta)
    await wa2.ok("sync")
    ack = await wa.ok("message.send", {"conversation_id": conv["id"], "client_message_id": "ws1",
                                       "ciphertext": "AAEC"})
    message = ack["message"]
    assert ack["created"] and message["seq"] == 1
    for device in (wb, wb2, wa2):
        event = await device.event("message.new")
        assert event["data"] == message
    await wa.no_event("message.new", 0.1)  # not echoed to the sending device
    # A REST send reaches every connection, the sender's devices included.
    rest = await api.send(tb, conv["id"], "rest1")
    for device in (wa, wa2, wb, wb2):
        assert (await device.event("message.new"))["data"]["id"] == rest["id"]
    # Same idempotency as REST: resending returns the original and pushes nothing.
    again = await wa.ok("message.send", {"conversation_id": conv["id"], "client_message_id": "ws1"})
    assert again == {"message": message, "created": False}
    await wb.no_event("message.new", 0.1)


async def test_a_burst_of_requests_is_answered_in_order_and_nothing_is_lost(api, ws_url):
    """200 sends written back to back: far past the 16 requests a connection may
    have waiting, so the server pauses reading and resumes; every one is stored,
    acked in order and pushed in order."""
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    count = 200
    for n in range(count):
        wa.conn.write_message(json.dumps({"type": "message.send", "id": f"b{n}", "data": {
            "conversation_id": conv["id"], "client_message_id": f"burst-{n}", "ciphertext": "AAEC"}}))
    acks = [await wa.event("ack") for _ in range(count)]  # ids not awaited by request() land in events
    assert [f["id"] for f in acks] == [f"b{n}" for n in range(count)]
    assert [f["data"]["message"]["seq"] for f in acks] == list(range(1, count + 1))
    pushed = [(await wb.event("message.new"))["data"]["seq"] for _ in range(count)]
    assert pushed == list(range(1, count + 1))
    # Pausing reading is the server's doing: the heartbeat never blames the client for it.
    assert not wa.closed.done() and not wb.closed.done()
    assert (await wa.request("ping"))["type"] == "pong"


async def test_frames_of_every_length_encoding_arrive_intact(api, ws_url, settings):
    """Server frames use a 7-bit, 16-bit or 64-bit length by size: a message.new of
    each size reaches the peer byte for byte, non-ASCII text included."""
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    for size in (3, 1000, settings.max_inline_ciphertext):  # the last one's frame is over 64 KiB
        ciphertext = base64.b64encode(os.urandom(size)).decode()
        sent = await wa.ok("message.send", {"conversation_id": conv["id"], "client_message_id": f"len-{size}",
                                            "ciphertext": ciphertext})
        assert (await wb.event("message.new"))["data"] == sent["message"]
        assert sent["message"]["ciphertext"] == ciphertext
    # Non-ASCII goes out as UTF-8: a new group's event carries the display names.
    status, body = await api.call("POST", "/api/auth/register", body={
        "username": "zoe", "password": "password123", "display_name": "Zoë 雪 🙂"})
    assert status == 201, body
    await api.conversation(ta, b, body["user"], title="Café ☕", accepted=False)
    event = (await wb.event("conversation.request"))["data"]
    assert event["title"] == "Café ☕"
    assert "Zoë 雪 🙂" in [p["display_name"] for p in event["participants"]]


async def test_receipts_reach_the_sender_live(api, ws_url):
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    message = (await wa.ok("message.send", {"conversation_id": conv["id"], "client_message_id": "r"}))["message"]
    await wb.event("message.new")
    receipt = (await wb.ok("message.delivered", {"message_id": message["id"]}))["receipt"]
    assert receipt["delivered_seq"] == 1 and receipt["read_seq"] == 0
    event = await wa.event("message.receipt")
    assert event["data"] == {"conversation_id": conv["id"], "user_id": b["id"], "delivered_seq": 1, "read_seq": 0}
    await api.call("POST", f"/api/messages/{message['id']}/read", tb)
    assert (await wa.event("message.receipt"))["data"]["read_seq"] == 1
    # Marking again changes nothing and tells nobody.
    await wb.ok("message.read", {"message_id": message["id"]})
    await wa.no_event("message.receipt", 0.1)


async def test_catch_up_after_reconnect_has_no_gap_and_no_duplicate(api, ws_url):
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    seen = []
    for i in range(3):
        await api.send(ta, conv["id"], f"before{i}")
        seen.append((await wb.event("message.new"))["data"]["seq"])
    wb.close()
    for i in range(5):  # sent while B is away
        await api.send(ta, conv["id"], f"away{i}")
    wb = await Ws.connect(ws_url, tb)
    # Sent after B reconnected but before it synced: held for the catch-up, not pushed first.
    await api.send(ta, conv["id"], "reconnecting")
    await wb.no_event("message.new", 0.2)

    # Keep sending while the catch-up runs, so some land at the seam.
    async def keep_sending():
        for i in range(10):
            await api.send(ta, conv["id"], f"seam{i}")

    sender = asyncio.ensure_future(keep_sending())
    ack = await wb.ok("sync", {"cursors": {conv["id"]: seen[-1]}})
    await sender
    got = []
    while len(got) < 16:  # seqs 4..19
        got.append((await wb.event("message.new"))["data"]["seq"])
    await wb.no_event("message.new", 0.3)  # and nothing twice
    assert got == list(range(4, 20)), got  # each once, catch-up first, in seq order
    assert ack["messages"] >= 6


async def test_a_client_that_never_syncs_still_gets_live_messages(api, ws_url, settings):
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    lazy = await Ws.connect(ws_url, tb)  # connects, never syncs
    await api.send(ta, conv["id"], "one")
    assert (await wb.event("message.new"))["data"]["seq"] == 1  # the synced device: at once
    held = await lazy.event("message.new")  # this one: once the grace has passed
    assert held["data"]["seq"] == 1
    await api.send(ta, conv["id"], "two")
    assert (await lazy.event("message.new"))["data"]["seq"] == 2


async def test_sync_without_cursor_starts_from_delivered(api, ws_url):
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    first = await api.send(ta, conv["id"], "one")
    await api.send(ta, conv["id"], "two")
    await api.call("POST", f"/api/messages/{first['id']}/delivered", tb)
    wb.close()
    fresh = await Ws.connect(ws_url, tb)
    assert (await fresh.ok("sync"))["messages"] == 1
    assert (await fresh.event("message.new"))["data"]["seq"] == 2


async def test_typing_is_relayed_and_expires(api, ws_url):
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    _, c = await api.register()
    await wa.ok("typing.start", {"conversation_id": conv["id"]})
    event = await wb.event("typing.start")
    assert event["data"] == {"conversation_id": conv["id"], "user_id": a["id"]}
    await wa.no_event("typing.start", 0.05)  # not to the typer
    started = time.monotonic()
    stop = await wb.event("typing.stop")
    assert stop["data"]["reason"] == "timeout"
    assert time.monotonic() - started >= TEST_SETTINGS.typing_timeout * 0.8
    await wa.ok("typing.start", {"conversation_id": conv["id"]})
    await wb.event("typing.start")
    await wa.ok("typing.stop", {"conversation_id": conv["id"]})
    assert (await wb.event("typing.stop"))["data"]["reason"] == "stopped"
    await wa.ok("typing.start", {"conversation_id": conv["id"]})
    await wb.event("typing.start")
    wa.close()
    assert (await wb.event("typing.stop"))["data"]["reason"] == "disconnected"
    reply = await wb.request("typing.start", {"conversation_id": "0" * 24})
    assert reply["type"] == "error" and reply["data"]["code"] == "conversation_not_found"


# A grace long enough that a reconnect on a slow machine still lands inside it.
@pytest.mark.parametrize("settings", [with_settings(presence_grace=1.0)], ids=["grace=1s"])
async def test_presence_grace_and_privacy(api, ws_url, settings):
    ta, a = await api.register()
    tb, b = await api.register()
    tx, x = await api.register()  # shares nothing with A
    await api.conversation(ta, b)
    wb = await Ws.connect(ws_url, tb)
    wx = await Ws.connect(ws_url, tx)
    wa = await Ws.connect(ws_url, ta)
    assert (await presence_of(wb, a["id"]))["status"] == "online"
    # Reconnecting within the grace period: nobody sees A go offline.
    wa.close()
    await asyncio.sleep(0.1)
    wa = await Ws.connect(ws_url, ta)
    with pytest.raises(asyncio.TimeoutError):
        await presence_of(wb, a["id"], timeout=settings.presence_grace * 1.5)
    # Gone for longer than the grace period: offline, with last_seen.
    wa.close()
    started = time.monotonic()
    event = await presence_of(wb, a["id"])
    assert event["status"] == "offline" and event["last_seen"]
    assert time.monotonic() - started >= settings.presence_grace * 0.8
    with pytest.raises(asyncio.TimeoutError):  # strangers never hear of A
        await presence_of(wx, a["id"], timeout=0.05)
    assert (await api.call("GET", f"/api/presence/{a['id']}", tx))[0] == 404
    status, body = await api.call("GET", f"/api/presence/{a['id']}", tb)
    assert status == 200 and body["presence"]["status"] == "offline"


async def test_chosen_status_survives_reconnects_and_invisible_hides(api, ws_url, settings):
    ta, a = await api.register()
    tb, b = await api.register()
    await api.conversation(ta, b)
    wb = await Ws.connect(ws_url, tb)
    wa = await Ws.connect(ws_url, ta)
    await presence_of(wb, a["id"])
    assert (await wa.ok("presence.set", {"status": "busy"}))["presence"]["status"] == "busy"
    assert (await presence_of(wb, a["id"]))["status"] == "busy"
    wa.close()
    assert (await presence_of(wb, a["id"]))["status"] == "offline"
    wa = await Ws.connect(ws_url, ta)
    assert (await presence_of(wb, a["id"]))["status"] == "busy"
    status, body = await api.call("POST", "/api/presence", ta, {"status": "offline"})
    assert status == 200 and body["presence"]["status"] == "offline"
    assert (await presence_of(wb, a["id"]))["status"] == "offline"
    status, body = await api.call("GET", f"/api/presence/{a['id']}", tb)
    assert body["presence"]["status"] == "offline"
    conversations = (await api.call("GET", "/api/conversations", tb))[1]["conversations"]
    shown = {p["id"]: p["presence"]["status"] for p in conversations[0]["participants"]}
    assert shown[a["id"]] == "offline" and shown[b["id"]] == "online"
    status, body = await api.call("POST", "/api/presence", ta, {"status": "sleeping"})
    assert status == 400


async def presence_of(ws: Ws, user_id: str, timeout: float = 3) -> dict:
    """The next presence event about `user_id` (skipping others, e.g. one's own)."""
    while True:
        event = await ws.event("presence", timeout=timeout)
        if event["data"]["user_id"] == user_id:
            return event["data"]


async def raw_ws_handshake(port: int, token: str) -> asyncio.StreamWriter:
    """A WebSocket client that completes the handshake and then never reads or answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4096)
    writer.write((f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert response.startswith(b"HTTP/1.1 101"), response
    writer.transport.pause_reading()  # never read again: the peer's frames pile up
    return writer


async def test_silent_client_is_reaped_within_two_ping_intervals(api, ws_url, http_port, app, settings):
    ta, a = await api.register()
    tb, b = await api.register()
    await api.conversation(ta, b)
    wb = await Ws.connect(ws_url, tb)
    sock = await raw_ws_handshake(http_port, ta)
    try:
        await presence_of(wb, a["id"])  # A online
        hub = app.settings["kisse"].hub
        started = time.monotonic()
        while hub.is_connected(a["id"]):
            assert time.monotonic() - started < settings.ws_ping * 4, "silent client was not reaped"
            await asyncio.sleep(0.02)
        reaped_after = time.monotonic() - started
        print(f"silent client reaped after {reaped_after:.2f}s (ping interval {settings.ws_ping}s)")
        assert reaped_after <= settings.ws_ping * 2 + 0.2
        assert (await presence_of(wb, a["id"]))["status"] == "offline"
    finally:
        sock.close()


@pytest.mark.parametrize("settings", [with_settings(ws_queue_bytes=256 * 1024)], ids=["queue=256KiB"])
async def test_non_reading_client_is_disconnected(api, ws_url, http_port, app):
    ta, a = await api.register()
    tb, b = await api.register()
    conv = await api.conversation(ta, b)
    sock = await raw_ws_handshake(http_port, tb)
    try:
        hub = app.settings["kisse"].hub
        ciphertext = "A" * 40_000
        sent = 0
        while hub.is_connected(b["id"]) and sent < 2000:
            await api.send(ta, conv["id"], f"flood{sent}", ciphertext)
            sent += 1
        assert not hub.is_connected(b["id"]), "slow consumer was never disconnected"
        print(f"non-reading client cut after {sent} messages of {len(ciphertext)} B base64")
        # It was cut off long before the flood ended: its queue stayed bounded.
        assert sent < 500
    finally:
        sock.close()


# ws_ping: the socket is aborted one interval after the 4008; a loaded machine needs time to read up to it.
@pytest.mark.parametrize("settings", [with_settings(ws_queue_bytes=256 * 1024, ws_ping=10.0)], ids=["queue=256KiB"])
async def test_a_slow_consumer_is_told_4008_before_the_socket_goes(api, http_port, app):
    ta, a = await api.register()
    tb, b = await api.register()
    conv = await api.conversation(ta, b)
    slow = await RawWs.connect(http_port, tb, receive_buffer=32 * 1024)
    slow.reader._transport.pause_reading()  # stops reading, like a stalled app
    hub = app.settings["kisse"].hub
    sent = 0
    while hub.is_connected(b["id"]) and sent < 2000:
        await api.send(ta, conv["id"], f"flood{sent}", "A" * 40_000)
        sent += 1
    assert not hub.is_connected(b["id"])
    slow.reader._transport.resume_reading()  # reads again: it finds the close frame after what it missed
    while True:
        opcode, _ = await asyncio.wait_for(slow.frame(), WAIT)
        if opcode == 0x8:
            break
    assert slow.close_code == 4008
    slow.close()
