"""Disappearing messages, retention and last_seen through HTTP and the WebSocket:
a timer any member sets, messages that carry their `expires_at` and are gone for
every read once it passes (and from storage at the next sweep), holes in seq that
say "expired" so that the gap-free promise still means "nothing lost"."""
from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime, timezone

import pytest

from storage.base import BlobNotFound
from tornado.httpclient import HTTPRequest

from tests.client import WAIT, Ws
from tests.conftest import with_settings
from tests.dump import dump, holds

pytestmark = pytest.mark.gen_test(timeout=60)


def parse(iso: str) -> datetime:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


async def set_ttl(api, token, conversation_id, ttl) -> tuple[int, dict]:
    return await api.call("PATCH", f"/api/conversations/{conversation_id}", token, {"message_ttl": ttl})


async def test_any_member_sets_the_timer_and_every_member_hears_it(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    group = await api.conversation(ta, bob, carol, title="club")  # alice is the admin, bob is not
    watching = await Ws.connect(ws_url, ta)
    await watching.ok("sync")
    status, body = await set_ttl(api, tb, group["id"], 3600)
    assert status == 200 and body["conversation"]["message_ttl"] == 3600
    event = await watching.event("conversation.updated")
    assert event["data"]["conversation_id"] == group["id"] and event["data"]["message_ttl"] == 3600
    assert (await api.call("GET", f"/api/conversations/{group['id']}", tc))[1]["conversation"]["message_ttl"] == 3600
    sent = await api.send(ta, group["id"], "timed", "AAEC")
    assert (parse(sent["expires_at"]) - parse(sent["created_at"])).total_seconds() == 3600
    for bad in (0, 365 * 86400 + 1, "1h", 1.5):
        status, err = await set_ttl(api, tb, group["id"], bad)
        assert status == 400 and err["error"]["code"] == "invalid_field", bad
    status, body = await set_ttl(api, tc, group["id"], None)
    assert status == 200 and body["conversation"]["message_ttl"] is None
    assert (await watching.event("conversation.updated"))["data"]["message_ttl"] is None
    assert (await api.send(ta, group["id"], "plain", "AAEC"))["expires_at"] is None
    outsider, _ = await api.register()
    status, _ = await set_ttl(api, outsider, group["id"], 60)
    assert status == 404
    watching.close()


@pytest.mark.parametrize("settings", [with_settings(min_message_ttl=5)], ids=["min=5"])
async def test_the_shortest_timer_is_a_setting(api):
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    status, err = await set_ttl(api, ta, conversation["id"], 4)
    assert status == 400 and err["error"]["details"]["field"] == "message_ttl"
    assert (await set_ttl(api, ta, conversation["id"], 5))[0] == 200
    assert (await api.call("GET", "/api/capabilities"))[1]["limits"]["message_ttl_min_seconds"] == 5


async def test_an_expired_message_is_gone_everywhere_and_its_hole_says_so(api, ws_url, storage):
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    cid = conversation["id"]
    kept = await api.send(ta, cid, "kept", "AAEC")
    await set_ttl(api, ta, cid, 1)
    short = await api.send(ta, cid, "short", "AAEC")
    upload = await api.send(ta, cid, "file")
    status, _ = await api.call("POST", f"/api/messages/{upload['id']}/content", ta, raw=b"attachment bytes",
                               headers={"Content-Type": "application/octet-stream"})
    assert status == 201
    blob_id = (await storage.get_message(upload["id"]))["blob_id"]
    conv = (await api.call("GET", f"/api/conversations/{cid}", tb))[1]["conversation"]
    assert conv["unread_count"] == 3 and conv["last_message"]["id"] == upload["id"]
    expires = parse(upload["expires_at"]).timestamp()
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    # Gone for every read at once.
    status, page = await api.call("GET", f"/api/conversations/{cid}/messages?after=0", tb)
    assert [m["id"] for m in page["messages"]] == [kept["id"]] and page["expired"] == [[2, 3]]
    status, page = await api.call("GET", f"/api/conversations/{cid}/messages", tb)
    assert [m["seq"] for m in page["messages"]] == [1] and page["expired"] == [[2, 3]]
    assert (await api.call("GET", f"/api/messages/{upload['id']}/content", tb))[0] == 404
    assert (await api.call("POST", f"/api/messages/{short['id']}/read", tb))[0] == 404
    conv = (await api.call("GET", f"/api/conversations/{cid}", tb))[1]["conversation"]
    assert conv["unread_count"] == 1 and conv["last_seq"] == 3
    # A catch-up never sends them, and says which seqs expired.
    ws = await Ws.connect(ws_url, tb)
    ack = await ws.ok("sync", {"cursors": {cid: 0}})
    assert ack["messages"] == 1 and ack["expired"] == {cid: [[2, 3]]}
    assert (await ws.event("message.new"))["data"]["id"] == kept["id"]
    await ws.no_event("message.new", wait=0.2)
    ws.close()
    # The sweep deletes them from storage: the blob, the record, and last_message moves back.
    deadline = time.monotonic() + WAIT
    while (await storage.list_messages(cid, after=0, limit=10))[0] and time.monotonic() < deadline:
        if (await storage.get_conversation(cid))["last_message"]["id"] == kept["id"]:
            break
        await asyncio.sleep(0.05)
    assert (await storage.get_conversation(cid))["last_message"]["id"] == kept["id"]
    with pytest.raises(BlobNotFound):
        async for _ in storage.read_blob(blob_id):
            pass
    conv = (await api.call("GET", f"/api/conversations/{cid}", tb))[1]["conversation"]
    assert conv["last_message"]["id"] == kept["id"]
    # The conversation goes on, numbering after the hole.
    assert (await api.send(tb, cid, "reply", "AAEC"))["seq"] == 4


@pytest.mark.parametrize("settings", [with_settings(retention_days=1.5 / 86400)], ids=["retention=1.5s"])
async def test_retention_forgets_messages_and_call_history(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    await api.send(ta, conversation["id"], "old", "AAEC")
    ws = await Ws.connect(ws_url, ta)
    call = (await ws.ok("call.start", {"callee_id": bob["id"], "media": "audio"}))["call"]
    await ws.ok("call.cancel", {"call_id": call["id"]})
    ws.close()
    assert len((await api.call("GET", "/api/calls/history", ta))[1]["calls"]) == 1
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        page = (await api.call("GET", f"/api/conversations/{conversation['id']}/messages", tb))[1]
        calls = (await api.call("GET", "/api/calls/history", ta))[1]["calls"]
        if not page["messages"] and not calls:
            break
        await asyncio.sleep(0.1)
    assert page["messages"] == [] and page["expired"] == [[1, 1]] and calls == []


@pytest.mark.parametrize("settings", [with_settings(last_seen_precision=3600, presence_grace=0.05)],
                         ids=["precision=1h"])
async def test_last_seen_is_coarse_and_can_be_hidden(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    await api.conversation(ta, bob)
    ws = await Ws.connect(ws_url, tb)
    await ws.ok("sync")
    ws.close()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        seen = (await api.call("GET", f"/api/presence/{bob['id']}", ta))[1]["presence"]
        if seen["last_seen"] and seen["status"] == "offline":
            break
        await asyncio.sleep(0.05)
    moment = parse(seen["last_seen"])
    assert seen["status"] == "offline" and moment.minute == moment.second == moment.microsecond == 0
    status, mine = await api.call("POST", "/api/presence", tb, {"show_last_seen": False})
    assert status == 200 and mine["presence"]["show_last_seen"] is False and mine["presence"]["last_seen"] is None
    assert (await api.call("GET", f"/api/presence/{bob['id']}", ta))[1]["presence"]["last_seen"] is None
    listed = (await api.call("GET", "/api/conversations", ta))[1]["conversations"][0]["participants"]
    assert all(p["presence"]["last_seen"] is None for p in listed if p["id"] == bob["id"])
    status, mine = await api.call("POST", "/api/presence", tb, {"show_last_seen": True})
    assert mine["presence"]["last_seen"] == seen["last_seen"]


@pytest.mark.parametrize("settings", [with_settings(min_message_ttl=5)], ids=["min=5"])
async def test_a_refused_timer_changes_no_title_either(api):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    group = await api.conversation(ta, bob, carol, title="before")
    status, err = await api.call("PATCH", f"/api/conversations/{group['id']}", ta,
                                 {"title": "after", "message_ttl": 2})
    assert status == 400 and err["error"]["details"]["field"] == "message_ttl"
    assert (await api.call("GET", f"/api/conversations/{group['id']}", ta))[1]["conversation"]["title"] == "before"
    status, body = await api.call("PATCH", f"/api/conversations/{group['id']}", ta, {"title": "after", "message_ttl": 60})
    assert status == 200 and body["conversation"]["title"] == "after" and body["conversation"]["message_ttl"] == 60


async def test_content_that_arrives_after_its_message_expired_is_not_kept(api, storage, base_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    await set_ttl(api, ta, conversation["id"], 1)
    message = await api.send(ta, conversation["id"], "late-file")
    secret = b"uploaded while it expired " + os.urandom(8).hex().encode()

    async def slow_body(write):  # half now, half once the message has expired and gone
        await write(secret[:10])
        deadline = time.monotonic() + WAIT
        while (await storage.list_messages(conversation["id"], after=0))[0] or \
                (await storage.get_conversation(conversation["id"]))["last_message"] is not None:
            assert time.monotonic() < deadline, "the sweep never came"
            await asyncio.sleep(0.05)
        await write(secret[10:])

    response = await api.http.fetch(HTTPRequest(
        f"{base_url}/api/messages/{message['id']}/content", method="POST", body_producer=slow_body,
        headers={"Authorization": f"Bearer {ta}", "Content-Type": "application/octet-stream",
                 "Content-Length": str(len(secret))}, request_timeout=30), raise_error=False)
    assert response.code == 404 and json.loads(response.body)["error"]["code"] == "message_not_found"
    assert not holds(b"\x00".join(await dump(storage)), secret)  # no orphan blob
