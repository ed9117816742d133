"""Users, conversations, messages, history and receipts through HTTP."""
from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

pytestmark = pytest.mark.gen_test


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_user_search_and_lookup(api):
    token, _ = await api.register("searcher")
    for name in ("Zara", "zack", "zed", "yan"):
        await api.register(name)
    status, body = await api.call("GET", "/api/users?q=ZA&limit=1", token)
    assert status == 200 and [u["username"] for u in body["users"]] == ["zack"]
    status, body = await api.call("GET", f"/api/users?q=za&limit=1&after={body['next_after']}", token)
    assert [u["username"] for u in body["users"]] == ["zara"] and body["next_after"] is None
    assert body["users"][0]["display_name"] == "Zara"  # as typed
    user = body["users"][0]
    assert await api.call("GET", f"/api/users/{user['id']}", token) == (200, {"user": user})
    status, body = await api.call("GET", "/api/users/" + "0" * 24, token)
    assert status == 404 and body["error"]["code"] == "user_not_found"


async def test_direct_conversation_is_unique_from_either_side(api):
    ta, a = await api.register()
    tb, b = await api.register()
    status, first = await api.call("POST", "/api/conversations", ta, {"participant_ids": [b["id"]]})
    assert status == 201 and first["conversation"]["kind"] == "direct"
    status, again = await api.call("POST", "/api/conversations", tb, {"participant_ids": [a["id"]]})
    assert status == 200 and again["conversation"]["id"] == first["conversation"]["id"]
    participants = {p["id"]: p for p in first["conversation"]["participants"]}
    assert set(participants) == {a["id"], b["id"]}
    assert {"id", "username", "display_name", "presence", "role"} == set(participants[b["id"]])


async def test_simultaneous_direct_requests_make_one_conversation(api):
    ta, a = await api.register()
    tb, b = await api.register()
    results = await asyncio.gather(
        *(api.call("POST", "/api/conversations", t, {"participant_ids": [o["id"]]})
          for t, o in [(ta, b), (tb, a)] * 4))
    assert len({body["conversation"]["id"] for _, body in results}) == 1
    assert sorted(status for status, _ in results) == [200] * 7 + [201]


async def test_group_conversation_and_errors(api, settings):
    ta, a = await api.register()
    _, b = await api.register()
    _, c = await api.register()
    status, body = await api.call("POST", "/api/conversations", ta,
                                  {"participant_ids": [b["id"], c["id"]], "title": "Trio"})
    assert status == 201 and body["conversation"]["kind"] == "group" and body["conversation"]["title"] == "Trio"
    status, body = await api.call("POST", "/api/conversations", ta, {"participant_ids": [b["id"], "f" * 24]})
    assert status == 400 and body["error"]["details"]["participant_ids"] == ["f" * 24]
    assert "f" * 24 in body["error"]["message"]
    status, body = await api.call("POST", "/api/conversations", ta, {"participant_ids": [a["id"]]})
    assert status == 400 and body["error"]["code"] == "too_few_participants"
    too_many = [f"{i:024x}" for i in range(settings.max_group_members)]
    status, body = await api.call("POST", "/api/conversations", ta, {"participant_ids": too_many})
    assert status == 400 and body["error"]["code"] == "too_many_participants"


async def test_listing_order_last_message_and_unread(api):
    ta, a = await api.register()
    tb, b = await api.register()
    tc, c = await api.register()
    first = await api.conversation(ta, b)
    second = await api.conversation(ta, c)
    await api.send(tb, first["id"], "m1", b64(b"\x01\x02"))
    await asyncio.sleep(0.003)
    m2 = await api.send(tb, first["id"], "m2")
    status, body = await api.call("GET", "/api/conversations", ta)
    assert [conv["id"] for conv in body["conversations"]] == [first["id"], second["id"]]
    top = body["conversations"][0]
    assert top["unread_count"] == 2 and top["last_message"]["id"] == m2["id"]
    assert body["conversations"][1]["unread_count"] == 0
    await api.call("POST", f"/api/messages/{m2['id']}/read", ta)
    status, body = await api.call("GET", f"/api/conversations/{first['id']}", ta)
    assert body["conversation"]["unread_count"] == 0
    status, page = await api.call("GET", "/api/conversations?limit=1", ta)
    assert len(page["conversations"]) == 1 and page["next_before"]
    status, page2 = await api.call("GET", f"/api/conversations?limit=1&before={page['next_before']}", ta)
    assert [conv["id"] for conv in page2["conversations"]] == [second["id"]] and page2["next_before"] is None
    # The sender's own messages never count as unread for them.
    status, body = await api.call("GET", f"/api/conversations/{first['id']}", tb)
    assert body["conversation"]["unread_count"] == 0


async def test_non_members_get_404_like_missing(api):
    ta, a = await api.register()
    _, b = await api.register()
    tx, _ = await api.register()
    conv = await api.conversation(ta, b)
    message = await api.send(ta, conv["id"], "secret", b64(b"ct"))
    for path in (f"/api/conversations/{conv['id']}", f"/api/conversations/{conv['id']}/messages",
                 f"/api/messages/{message['id']}/content", f"/api/messages/{message['id']}/receipts"):
        outsider = await api.call("GET", path, tx)
        missing = await api.call("GET", path.replace(conv["id"], "0" * 24).replace(message["id"], "0" * 24), tx)
        assert outsider[0] == 404 and outsider == missing, path
    for path in (f"/api/messages/{message['id']}/read", f"/api/messages/{message['id']}/delivered"):
        assert (await api.call("POST", path, tx))[0] == 404
    status, _ = await api.call("POST", "/api/messages", tx, {"conversation_id": conv["id"], "client_message_id": "x"})
    assert status == 404


async def test_send_shape_and_idempotency(api):
    ta, a = await api.register()
    _, b = await api.register()
    conv = await api.conversation(ta, b)
    body = {"conversation_id": conv["id"], "client_message_id": "3f1c-uuid", "ciphertext": b64(b"sealed")}
    status, first = await api.call("POST", "/api/messages", ta, body)
    assert status == 201
    message = first["message"]
    assert message["seq"] == 1 and message["sender_id"] == a["id"] and message["client_message_id"] == "3f1c-uuid"
    assert message["content"] == {"size": 6, "sha256": hashlib.sha256(b"sealed").hexdigest(), "inline": True}
    assert message["ciphertext"] == b64(b"sealed")
    status, again = await api.call("POST", "/api/messages", ta, body)
    assert status == 200 and again["message"] == message
    other = await api.conversation(ta, (await api.register())[1])
    status, err = await api.call("POST", "/api/messages", ta, {**body, "conversation_id": other["id"]})
    assert status == 409 and err["error"]["code"] == "client_message_id_reused"


async def test_racing_identical_sends_make_one_message(api):
    ta, a = await api.register()
    _, b = await api.register()
    conv = await api.conversation(ta, b)
    body = {"conversation_id": conv["id"], "client_message_id": "dup"}
    results = await asyncio.gather(*(api.call("POST", "/api/messages", ta, body) for _ in range(8)))
    assert len({r["message"]["id"] for _, r in results}) == 1
    assert sorted(s for s, _ in results) == [200] * 7 + [201]
    status, history = await api.call("GET", f"/api/conversations/{conv['id']}/messages", ta)
    assert [m["seq"] for m in history["messages"]] == [1]


async def test_fifty_concurrent_sends_get_seqs_one_to_fifty(api):
    tokens, users = zip(*[await api.register() for _ in range(5)])
    status, body = await api.call("POST", "/api/conversations", tokens[0],
                                  {"participant_ids": [u["id"] for u in users[1:]]})
    conv = body["conversation"]
    sends = [api.send(tokens[i % 5], conv["id"], f"c{i}") for i in range(50)]
    messages = await asyncio.gather(*sends)
    assert sorted(m["seq"] for m in messages) == list(range(1, 51))
    status, history = await api.call("GET", f"/api/conversations/{conv['id']}/messages?limit=200", tokens[0])
    assert [m["seq"] for m in history["messages"]] == list(range(1, 51)) and not history["has_more"]


async def test_ciphertext_limits(api, settings):
    ta, a = await api.register()
    _, b = await api.register()
    conv = await api.conversation(ta, b)
    for ciphertext, code in [("not base64!", "invalid_ciphertext"),
                             (b64(b"x" * (settings.max_inline_ciphertext + 1)), "ciphertext_too_large")]:
        status, body = await api.call("POST", "/api/messages", ta, {"conversation_id": conv["id"],
                                                                     "client_message_id": code,
                                                                     "ciphertext": ciphertext})
        assert status == 400 and body["error"]["code"] == code
    status, body = await api.call("POST", "/api/messages", ta, {"conversation_id": conv["id"]})
    assert status == 400 and body["error"]["details"]["fields"] == ["client_message_id"]


async def test_history_pagination(api):
    ta, a = await api.register()
    _, b = await api.register()
    conv = await api.conversation(ta, b)
    for i in range(7):
        await api.send(ta, conv["id"], f"h{i}")
    base = f"/api/conversations/{conv['id']}/messages"

    async def page(query):
        status, body = await api.call("GET", base + query, ta)
        assert status == 200, body
        return [m["seq"] for m in body["messages"]], body["has_more"]

    assert await page("") == (list(range(1, 8)), False)
    assert await page("?limit=3") == ([5, 6, 7], True)
    assert await page("?limit=3&before=5") == ([2, 3, 4], True)
    assert await page("?after=5") == ([6, 7], False)
    assert await page("?after=0&limit=2") == ([1, 2], True)
    for query in ("?limit=201", "?limit=0", "?before=0", "?after=-1", "?before=3&after=1"):
        status, body = await api.call("GET", base + query, ta)
        assert status == 400 and body["error"]["code"] == "invalid_query", query


async def test_receipts_move_forward_and_are_visible_per_member(api):
    ta, a = await api.register()
    tb, b = await api.register()
    tc, c = await api.register()
    conv = await api.conversation(ta, b, c)
    m1 = await api.send(ta, conv["id"], "r1")
    m2 = await api.send(ta, conv["id"], "r2")
    status, receipt = await api.call("POST", f"/api/messages/{m2['id']}/delivered", tb)
    assert status == 200 and receipt["receipt"]["delivered_seq"] == 2 and receipt["receipt"]["read_seq"] == 0
    status, receipt = await api.call("POST", f"/api/messages/{m1['id']}/read", tb)
    assert receipt["receipt"] == {"conversation_id": conv["id"], "user_id": b["id"],
                                  "delivered_seq": 2, "read_seq": 1}
    status, body = await api.call("GET", f"/api/messages/{m1['id']}/receipts", ta)
    assert status == 200
    recipients = {r["user_id"]: r for r in body["recipients"]}
    assert recipients[b["id"]] == {"user_id": b["id"], "delivered": True, "read": True}
    assert recipients[c["id"]] == {"user_id": c["id"], "delivered": False, "read": False}
    assert a["id"] not in recipients
    status, body = await api.call("GET", f"/api/messages/{m2['id']}/receipts", ta)
    assert {r["user_id"]: r["read"] for r in body["recipients"]}[b["id"]] is False
