"""Message requests, blocking, leaving, group changes and the contact boundary,
through HTTP and the WebSocket, from both sides."""
from __future__ import annotations

import asyncio

import pytest

from tests.client import Ws

pytestmark = pytest.mark.gen_test(timeout=60)


async def test_a_stranger_group_harvests_no_presence_and_gets_no_live_presence(api, ws_url):
    """The 255-member stranger group of the issue, at 20 members: nobody's presence shows."""
    tm, mallory = await api.register()
    victims = [await api.register() for _ in range(20)]
    sockets = [await Ws.connect(ws_url, token) for token, _ in victims[:3]]
    spy = await Ws.connect(ws_url, tm)
    try:
        status, body = await api.call("POST", "/api/conversations", tm,
                                      {"participant_ids": [u["id"] for _, u in victims], "title": "hi"})
        assert status == 201
        shown = {p["id"]: p["presence"] for p in body["conversation"]["participants"]}
        assert all(shown[u["id"]] is None for _, u in victims)
        assert shown[mallory["id"]]["status"] == "online"
        for token, user in victims[:3]:
            assert (await api.call("GET", f"/api/presence/{user['id']}", tm))[0] == 404
        request = (await sockets[0].event("conversation.request"))["data"]
        assert request["membership"] == {"state": "request", "role": "member"}
        await sockets[0].request("presence.set", {"status": "busy"})
        await asyncio.sleep(0.5)
        seen = []
        while not spy.events.empty():
            frame = spy.events.get_nowait()
            if frame["type"] == "presence":
                seen.append(frame["data"]["user_id"])
        assert set(seen) <= {mallory["id"]}  # her own devices hear her own presence, nothing else
        # A victim who accepts becomes Mallory's contact (and only hers).
        await api.call("POST", f"/api/conversations/{body['conversation']['id']}/accept", victims[0][0])
        assert (await api.call("GET", f"/api/presence/{victims[0][1]['id']}", tm))[0] == 200
        assert (await api.call("GET", f"/api/presence/{victims[1][1]['id']}", victims[0][0]))[0] == 404
    finally:
        for ws in (*sockets, spy):
            ws.close()


async def test_a_strangers_call_is_refused_and_never_makes_you_busy_for_a_friend(api, ws_url):
    ts, stranger = await api.register()
    tv, victim = await api.register()
    tf, friend = await api.register()
    await api.conversation(tf, victim)
    await api.conversation(ts, victim, accepted=False)
    ws = await Ws.connect(ws_url, tv)
    try:
        for _ in range(5):
            status, body = await api.call("POST", "/api/calls", ts, {"callee_id": victim["id"], "media": "audio"})
            assert status == 403 and body["error"]["code"] == "not_a_contact"
        status, body = await api.call("POST", "/api/calls", tf, {"callee_id": victim["id"], "media": "audio"})
        assert status == 201 and body["call"]["status"] == "pending"
        incoming = (await ws.event("call.incoming"))["data"]
        assert incoming["caller_id"] == friend["id"]
        active = (await api.call("GET", "/api/calls/active", tv))[1]["calls"]
        assert [c["caller_id"] for c in active] == [friend["id"]]
    finally:
        ws.close()


async def test_requests_are_filtered_and_replying_accepts(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    conv = await api.conversation(ta, bob, accepted=False)
    listed = lambda token, f: api.call("GET", f"/api/conversations?filter={f}", token)  # noqa: E731
    assert [c["id"] for c in (await listed(tb, "requests"))[1]["conversations"]] == [conv["id"]]
    assert (await api.call("GET", "/api/conversations", tb))[1]["conversations"] == []  # default: accepted
    assert [c["id"] for c in (await listed(tb, "all"))[1]["conversations"]] == [conv["id"]]
    assert [c["id"] for c in (await listed(ta, "accepted"))[1]["conversations"]] == [conv["id"]]
    wa = await Ws.connect(ws_url, ta)
    wb = await Ws.connect(ws_url, tb)
    try:
        sent = await api.send(ta, conv["id"], "hi")
        assert (await wb.event("message.new"))["data"]["id"] == sent["id"]  # requests get messages
        await wb.request("typing.start", {"conversation_id": conv["id"]})
        await wb.request("message.read", {"message_id": sent["id"]})
        await wa.no_event("typing.start", 0.3)
        await wa.no_event("message.receipt", 0.3)
        reply = await wb.request("message.send", {"conversation_id": conv["id"], "client_message_id": "yo"})
        assert reply["type"] == "ack"
        assert (await wb.event("conversation.updated"))["data"]["membership"]["state"] == "accepted"
        assert [c["id"] for c in (await listed(tb, "accepted"))[1]["conversations"]] == [conv["id"]]
        await wb.request("typing.start", {"conversation_id": conv["id"]})
        assert (await wa.event("typing.start"))["data"]["user_id"] == bob["id"]
    finally:
        wa.close()
        wb.close()


async def test_declining_leaves_and_a_block_stops_new_requests_and_group_messages(api, ws_url):
    ts, spammer = await api.register()
    tv, victim = await api.register()
    tf, friend = await api.register()
    conv = await api.conversation(ts, victim, accepted=False)
    assert (await api.call("POST", f"/api/conversations/{conv['id']}/decline", tv))[0] == 204
    assert (await api.call("POST", f"/api/conversations/{conv['id']}/decline", tv))[0] == 404
    assert (await api.call("GET", "/api/conversations?filter=all", tv))[1]["conversations"] == []
    # Creating it again is a new request; after a block, the same answer as an unknown id.
    assert (await api.call("POST", "/api/conversations", ts, {"participant_ids": [victim["id"]]}))[0] == 200
    assert len((await api.call("GET", "/api/conversations?filter=requests", tv))[1]["conversations"]) == 1
    assert (await api.call("POST", f"/api/users/{spammer['id']}/block", tv))[0] == 204
    for participants in ([victim["id"]], [victim["id"], friend["id"]]):
        status, body = await api.call("POST", "/api/conversations", ts, {"participant_ids": participants})
        assert status == 400 and body["error"]["code"] == "unknown_participants"
        assert body["error"]["details"]["participant_ids"] == [victim["id"]]
    blocks = (await api.call("GET", "/api/blocks", tv))[1]["blocks"]
    assert [(b["user_id"], b["username"]) for b in blocks] == [(spammer["id"], spammer["username"])]
    # In a group they share, the blocked sender's messages do not reach the victim.
    group = await api.conversation(tf, victim, spammer)
    wv = await Ws.connect(ws_url, tv)
    try:
        spam = await api.send(ts, group["id"], "spam")
        real = await api.send(tf, group["id"], "real")
        assert (await wv.event("message.new"))["data"]["id"] == real["id"]
        history = (await api.call("GET", f"/api/conversations/{group['id']}/messages", tv))[1]["messages"]
        assert [(m["seq"], m["tombstone"], m["ciphertext"]) for m in history] == [(1, "blocked", None), (2, None, None)]
        assert history[0]["id"] == spam["id"] and history[0]["sender_id"] is None
        sync = await Ws.connect(ws_url, tv)
        try:
            await sync.request("sync", {"cursors": {group["id"]: 0}})
            first = (await sync.event("message.new"))["data"]
            assert first["tombstone"] == "blocked" and first["sender_id"] is None
        finally:
            sync.close()
        assert (await api.call("DELETE", f"/api/users/{spammer['id']}/block", tv))[0] == 204
        again = await api.send(ts, group["id"], "after")
        assert (await wv.event("message.new"))["data"]["id"] == again["id"]
    finally:
        wv.close()


async def test_leaving_cuts_off_new_messages_and_later_history(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    group = await api.conversation(ta, bob, carol, title="g")
    before = await api.send(ta, group["id"], "before")
    assert (await api.call("POST", f"/api/messages/{before['id']}/content", ta, raw=b"\x07" * 100))[0] == 201
    wb = await Ws.connect(ws_url, tb)
    try:
        assert (await api.call("POST", f"/api/conversations/{group['id']}/leave", tc))[0] == 204
        removed = (await wb.event("member.removed"))["data"]
        assert removed == {"conversation_id": group["id"], "user_id": carol["id"], "by": carol["id"], "reason": "left"}
    finally:
        wb.close()
    after = await api.send(ta, group["id"], "after")
    assert (await api.call("POST", f"/api/messages/{after['id']}/content", ta, raw=b"\x08" * 100))[0] == 201
    assert await api.call("GET", f"/api/messages/{before['id']}/content", tc) == (200, b"\x07" * 100)
    assert (await api.call("GET", f"/api/messages/{after['id']}/content", tc))[0] == 404
    status, body = await api.call("GET", f"/api/conversations/{group['id']}/messages", tc)
    assert status == 200 and [m["client_message_id"] for m in body["messages"]] == ["before"]
    view = (await api.call("GET", f"/api/conversations/{group['id']}", tc))[1]["conversation"]
    assert view["membership"] == {"state": "left", "role": "member", "up_to_seq": 1} and view["last_seq"] == 1
    status, body = await api.call("POST", "/api/messages", tc, {"conversation_id": group["id"],
                                                                "client_message_id": "x"})
    assert status == 404
    # A direct conversation left by one side: readable for the other, closed to new messages.
    direct = await api.conversation(ta, bob)
    await api.call("POST", f"/api/conversations/{direct['id']}/leave", tb)
    status, body = await api.call("POST", "/api/messages", ta, {"conversation_id": direct["id"],
                                                                "client_message_id": "y"})
    assert status == 409 and body["error"]["code"] == "conversation_closed"
    assert (await api.call("GET", f"/api/conversations/{direct['id']}/messages", ta))[0] == 200


async def test_only_admins_change_a_group_and_everyone_sees_it_live(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    td, dave = await api.register()
    group = await api.conversation(ta, bob, carol, title="g")
    base = f"/api/conversations/{group['id']}"
    for method, path, body in (("POST", "/members", {"user_ids": [dave["id"]]}), ("DELETE", f"/members/{carol['id']}", None),
                               ("PATCH", f"/members/{carol['id']}", {"role": "admin"}), ("PATCH", "", {"title": "x"})):
        status, answer = await api.call(method, base + path, tb, body)
        assert status == 403 and answer["error"]["code"] == "not_admin", (method, path)
    wb = await Ws.connect(ws_url, tb)
    wd = await Ws.connect(ws_url, td)
    try:
        status, body = await api.call("POST", base + "/members", ta, {"user_ids": [dave["id"], bob["id"]]})
        assert status == 200 and body["added"] == [dave["id"]]
        assert (await wb.event("member.added"))["data"] == {"conversation_id": group["id"], "user_ids": [dave["id"]],
                                                             "by": alice["id"]}
        assert (await wd.event("conversation.request"))["data"]["membership"]["state"] == "request"
        assert (await api.call("PATCH", base, ta, {"title": "trip"}))[1]["conversation"]["title"] == "trip"
        assert (await wb.event("conversation.updated"))["data"]["title"] == "trip"
        status, body = await api.call("PATCH", f"{base}/members/{bob['id']}", ta, {"role": "admin"})
        roles = {p["id"]: p["role"] for p in body["conversation"]["participants"]}
        assert status == 200 and roles[bob["id"]] == "admin" and roles[carol["id"]] == "member"
        assert (await api.call("DELETE", f"{base}/members/{carol['id']}", tb))[0] == 204  # bob is admin now
        assert (await wb.event("member.removed"))["data"]["reason"] == "removed"
        assert (await api.call("GET", f"{base}/messages", tc))[0] == 200  # what was before stays hers
        assert (await api.call("PATCH", f"{base}/members/{alice['id']}", ta, {"role": "member"}))[0] == 200
        status, body = await api.call("PATCH", f"{base}/members/{bob['id']}", tb, {"role": "member"})
        assert status == 409 and body["error"]["code"] == "last_admin"
    finally:
        wb.close()
        wd.close()
    direct = await api.conversation(ta, bob)
    status, body = await api.call("POST", f"/api/conversations/{direct['id']}/members", ta, {"user_ids": [dave["id"]]})
    assert status == 409 and body["error"]["code"] == "not_a_group"


async def test_a_group_receipt_reaches_the_sender_and_the_readers_devices_only(api, ws_url):
    """O(members) frames per group message, not O(members²)."""
    people = [await api.register() for _ in range(8)]
    (ts, sender), readers = people[0], people[1:]
    group = await api.conversation(ts, *(u for _, u in readers))
    sockets = {user["id"]: await Ws.connect(ws_url, token) for token, user in people}
    second = await Ws.connect(ws_url, readers[0][0])  # a reader's other device
    try:
        message = await api.send(ts, group["id"], "hello all")
        for _, user in readers:
            await sockets[user["id"]].event("message.new")
        for token, _ in readers:
            assert (await api.call("POST", f"/api/messages/{message['id']}/delivered", token))[0] == 200
        got = [(await sockets[sender["id"]].event("message.receipt"))["data"]["user_id"] for _ in readers]
        assert sorted(got) == sorted(u["id"] for _, u in readers)
        assert (await second.event("message.receipt"))["data"]["user_id"] == readers[0][1]["id"]
        await asyncio.sleep(0.3)
        for _, user in readers:  # each reader's devices hear their own receipt, nobody else's
            heard = []
            while not sockets[user["id"]].events.empty():
                frame = sockets[user["id"]].events.get_nowait()
                if frame["type"] == "message.receipt":
                    heard.append(frame["data"]["user_id"])
            assert heard == [user["id"]]
    finally:
        for ws in (*sockets.values(), second):
            ws.close()


async def test_racing_adds_and_leaves_keep_one_membership(api):
    ta, alice = await api.register()
    others = [await api.register() for _ in range(8)]
    group = await api.conversation(ta, *(u for _, u in others[:4]))
    base = f"/api/conversations/{group['id']}"
    results = await asyncio.gather(
        *(api.call("POST", base + "/members", ta, {"user_ids": [u["id"]]}) for _, u in others[4:]),
        *(api.call("POST", base + "/leave", t) for t, _ in others[:2]))
    assert all(status in (200, 204) for status, _ in results)
    view = (await api.call("GET", base, ta))[1]["conversation"]
    assert {p["id"] for p in view["participants"]} == {alice["id"], *(u["id"] for _, u in others[2:])}


async def test_a_request_sees_no_receipts_no_group_events_and_a_blocked_sender_no_badge(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tx, stranger = await api.register()
    _, dora = await api.register()
    group = await api.conversation(ta, bob, dora, title="g")
    message = await api.send(ta, group["id"], "m1")
    await api.call("POST", f"/api/messages/{message['id']}/read", tb)
    added = await api.call("POST", f"/api/conversations/{group['id']}/members", ta, {"user_ids": [stranger["id"]]})
    assert added[0] == 200
    assert (await api.call("GET", f"/api/messages/{message['id']}/receipts", tx))[0] == 404
    wx = await Ws.connect(ws_url, tx)
    try:
        await api.call("PATCH", f"/api/conversations/{group['id']}", ta, {"title": "spam title"})
        _, carol = await api.register()
        await api.call("POST", f"/api/conversations/{group['id']}/members", ta, {"user_ids": [carol["id"]]})
        await wx.no_event("conversation.updated", 0.3)
        await wx.no_event("member.added", 0.1)
    finally:
        wx.close()
    # Bob blocks Alice: her messages neither count nor show in his list.
    await api.call("POST", f"/api/users/{alice['id']}/block", tb)
    for n in range(3):
        await api.send(ta, group["id"], f"after-block-{n}")
    view = (await api.call("GET", f"/api/conversations/{group['id']}", tb))[1]["conversation"]
    assert view["unread_count"] == 0
    assert view["last_message"]["tombstone"] == "blocked" and view["last_message"]["sender_id"] is None


async def test_someone_who_left_sees_the_conversation_as_it_was(api):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    group = await api.conversation(ta, bob, carol, title="before")
    await api.call("POST", f"/api/conversations/{group['id']}/leave", tc)
    await api.call("PATCH", f"/api/conversations/{group['id']}", ta, {"title": "secret"})
    await api.send(ta, group["id"], "later")
    view = (await api.call("GET", f"/api/conversations/{group['id']}", tc))[1]["conversation"]
    assert view["title"] == "before" and view["participants"] == [] and view["last_message"] is None
    assert view["last_seq"] == 0 and view["membership"]["state"] == "left"
