"""The storage contract: every backend in `BACKENDS` must pass all of it.

Tests talk to the `Storage` interface only; the `storage` fixture is
parametrized over every backend (see tests/conftest.py).
"""
from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest

from storage.base import BlobNotFound, BlobTooLarge, UsernameTaken, utcnow

pytestmark = pytest.mark.gen_test


async def make_users(storage, *names):
    return [await storage.create_user(name, "hash-" + name, name.title()) for name in names]


async def test_ping_answers(storage):
    await storage.ping()


async def test_user_round_trip_hides_hash(storage):
    (alice,) = await make_users(storage, "alice")
    assert set(alice) == {"id", "username", "display_name", "created_at", "deleted"} and not alice["deleted"]
    assert await storage.get_user(alice["id"]) == alice
    assert await storage.get_user("0" * 24) is None
    user, password_hash = await storage.get_credentials("ALICE")
    assert user == alice and password_hash == "hash-alice"
    assert await storage.get_credentials("nobody") is None


async def test_usernames_are_unique_case_insensitively(storage):
    await make_users(storage, "Bob")
    with pytest.raises(UsernameTaken):
        await storage.create_user("bob", "h", "Other")


async def test_concurrent_registration_of_one_name_has_one_winner(storage):
    results = await asyncio.gather(*(storage.create_user("racer", "h", "R") for _ in range(10)),
                                   return_exceptions=True)
    assert sum(1 for r in results if isinstance(r, dict)) == 1
    assert all(isinstance(r, UsernameTaken) for r in results if not isinstance(r, dict))


async def test_search_users_by_prefix_paginates(storage):
    await make_users(storage, "carol", "carl", "Cassie", "dave")
    first = await storage.search_users("ca", limit=2)
    assert [u["username"] for u in first] == ["carl", "carol"]
    rest = await storage.search_users("ca", limit=2, after="carol")
    assert [u["username"] for u in rest] == ["Cassie"]
    assert await storage.search_users("zz", limit=5) == []


async def test_get_users_skips_missing(storage):
    a, b = await make_users(storage, "erin", "frank")
    found = await storage.get_users([a["id"], "f" * 24, b["id"]])
    assert sorted(u["id"] for u in found) == sorted([a["id"], b["id"]])


async def test_direct_conversation_is_unique_per_pair_even_when_racing(storage):
    a, b = await make_users(storage, "gina", "hank")
    results = await asyncio.gather(*(storage.get_or_create_direct(*((a["id"], b["id"]) if i % 2 else
                                                                   (b["id"], a["id"])))
                                     for i in range(10)))
    ids = {conv["id"] for conv, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    conv = results[0][0]
    assert conv["kind"] == "direct" and sorted(conv["participant_ids"]) == sorted([a["id"], b["id"]])
    assert conv["last_seq"] == 0 and conv["last_message"] is None


async def test_group_and_listing_order_and_contacts(storage):
    a, b, c, d = await make_users(storage, "ivy", "jack", "kate", "liam")
    group = await storage.create_group(a["id"], [a["id"], b["id"], c["id"]], "Trip")
    await tick()
    direct, _ = await storage.get_or_create_direct(a["id"], d["id"])
    await tick()
    assert group["kind"] == "group" and group["title"] == "Trip"
    await storage.add_message(group["id"], b["id"], "m1", None, None)
    listed = await storage.list_conversations(a["id"], limit=10)
    assert [conv["id"] for conv in listed] == [group["id"], direct["id"]]
    assert listed[0]["last_message"]["client_message_id"] == "m1"
    page2 = await storage.list_conversations(
        a["id"], limit=10, before=(listed[0]["last_activity_at"], listed[0]["id"]))
    assert [conv["id"] for conv in page2] == [direct["id"]]
    assert await storage.contact_ids(a["id"]) == set()  # nobody has accepted yet
    for user, conversation in ((b, group), (c, group), (d, direct)):
        await storage.accept_conversation(conversation["id"], user["id"])
    assert await storage.contact_ids(a["id"]) == {b["id"], c["id"], d["id"]}
    assert await storage.contact_ids(d["id"]) == {a["id"]}
    assert await storage.list_conversations(d["id"], limit=1) == [await storage.get_conversation(direct["id"])]


async def test_fifty_concurrent_sends_get_seqs_one_to_fifty(storage):
    a, b = await make_users(storage, "mia", "noah")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    results = await asyncio.gather(*(storage.add_message(conv["id"], (a, b)[i % 2]["id"], f"c{i}", None, None)
                                     for i in range(50)))
    assert sorted(m["seq"] for m, created in results if created) == list(range(1, 51))
    assert (await storage.get_conversation(conv["id"]))["last_seq"] == 50


async def test_same_client_message_id_is_idempotent_even_when_racing(storage):
    a, b = await make_users(storage, "olga", "pete")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    results = await asyncio.gather(*(storage.add_message(conv["id"], a["id"], "same", b"\x01", None)
                                     for _ in range(10)))
    assert len({m["id"] for m, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    messages, more = await storage.list_messages(conv["id"])
    assert [m["seq"] for m in messages] == [1] and not more
    # Another sender may reuse the same client id: ids are unique per sender.
    other, created = await storage.add_message(conv["id"], b["id"], "same", None, None)
    assert created and other["seq"] == 2


async def test_message_record_shape_and_inline_bytes(storage):
    a, b = await make_users(storage, "quinn", "rosa")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    content = {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest(), "inline": True}
    message, _ = await storage.add_message(conv["id"], a["id"], "x", b"abc", content)
    assert set(message) == {"id", "conversation_id", "sender_id", "seq", "client_message_id",
                            "created_at", "expires_at", "content", "ciphertext", "blob_id", "tombstone"}
    assert message["tombstone"] is None and message["expires_at"] is None
    assert message["ciphertext"] == b"abc" and message["content"] == content
    assert await storage.get_message(message["id"]) == message
    assert await storage.get_message("e" * 24) is None


async def test_history_pages_both_ways(storage):
    a, b = await make_users(storage, "sam", "tina")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    for i in range(7):
        await storage.add_message(conv["id"], a["id"], f"h{i}", None, None)

    async def seqs(**kw):
        page, more = await storage.list_messages(conv["id"], **kw)
        return [m["seq"] for m in page], more

    assert await seqs(limit=3) == ([5, 6, 7], True)
    assert await seqs(before=5, limit=3) == ([2, 3, 4], True)
    assert await seqs(before=3, limit=3) == ([1, 2], False)
    assert await seqs(after=0, limit=3) == ([1, 2, 3], True)
    assert await seqs(after=4, limit=3) == ([5, 6, 7], False)
    assert await seqs(after=7, limit=3) == ([], False)
    assert await seqs(limit=10) == ([1, 2, 3, 4, 5, 6, 7], False)


async def test_unread_counts_skip_own_messages(storage):
    a, b = await make_users(storage, "uma", "vic")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    for i, sender in enumerate([a, b, b, a, b]):
        await storage.add_message(conv["id"], sender["id"], f"u{i}", None, None)
    assert await storage.count_unread(conv["id"], a["id"], 0) == 3
    assert await storage.count_unread(conv["id"], a["id"], 3) == 1
    assert await storage.count_unread(conv["id"], b["id"], 0) == 2


async def test_receipts_only_move_forward_and_read_implies_delivered(storage):
    a, b = await make_users(storage, "walt", "xena")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    assert await storage.get_receipts(conv["id"]) == {}
    def moved(answer):
        receipt, before = answer
        return receipt, (receipt["delivered_seq"], receipt["read_seq"]) != (before["delivered_seq"], before["read_seq"])
    r, before = await storage.advance_receipt(conv["id"], b["id"], "delivered", 5)
    assert (r, before) == ({"user_id": b["id"], "delivered_seq": 5, "read_seq": 0}, {"delivered_seq": 0, "read_seq": 0})
    r, m = moved(await storage.advance_receipt(conv["id"], b["id"], "delivered", 2))
    assert (r["delivered_seq"], m) == (5, False)
    r, before = await storage.advance_receipt(conv["id"], b["id"], "read", 7)
    assert (r, before) == ({"user_id": b["id"], "delivered_seq": 7, "read_seq": 7}, {"delivered_seq": 5, "read_seq": 0})
    r, m = moved(await storage.advance_receipt(conv["id"], b["id"], "read", 3))
    assert (r["read_seq"], m) == (7, False)
    r, m = moved(await storage.advance_receipt(conv["id"], b["id"], "read", 5))  # delivered 7, read 7: no move
    assert m is False
    r, m = moved(await storage.advance_receipt(conv["id"], a["id"], "read", 4))  # a first receipt that is a read
    assert (r, m) == ({"user_id": a["id"], "delivered_seq": 4, "read_seq": 4}, True)
    assert (await storage.get_receipts(conv["id"]))[b["id"]]["read_seq"] == 7


async def tick():
    """Let the millisecond clock move, so time-ordered records have distinct times."""
    await asyncio.sleep(0.003)


async def read_all(storage, blob_id, start=0, end=None):
    return b"".join([chunk async for chunk in storage.read_blob(blob_id, start, end)])


async def test_blob_round_trip_ranges_and_sha(storage):
    data = bytes(range(256)) * 4000  # ~1 MB, several backend chunks
    writer = await storage.open_blob_writer(max_size=len(data))
    for i in range(0, len(data), 65536):
        await writer.write(data[i:i + 65536])
    size, sha = await writer.finish()
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    assert await read_all(storage, writer.blob_id) == data
    for start, end in [(0, 1), (255 * 1024 - 1, 255 * 1024 + 1), (500_000, 900_000), (len(data) - 5, None)]:
        assert await read_all(storage, writer.blob_id, start, end) == data[start:end]
    await storage.delete_blob(writer.blob_id)
    with pytest.raises(BlobNotFound):
        await read_all(storage, writer.blob_id)
    await storage.delete_blob(writer.blob_id)  # already gone: no error


async def test_oversized_blob_is_refused_and_leaves_nothing(storage):
    writer = await storage.open_blob_writer(max_size=100)
    await writer.write(b"x" * 60)
    with pytest.raises(BlobTooLarge):
        await writer.write(b"x" * 60)
    with pytest.raises(BlobNotFound):
        await read_all(storage, writer.blob_id)


async def test_aborted_blob_leaves_nothing(storage):
    writer = await storage.open_blob_writer(max_size=10_000_000)
    await writer.write(b"y" * 300_000)
    await writer.abort()
    await writer.abort()
    with pytest.raises(BlobNotFound):
        await read_all(storage, writer.blob_id)


async def test_attach_content_is_compare_and_set(storage):
    a, b = await make_users(storage, "yuri", "zoe")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    message, _ = await storage.add_message(conv["id"], a["id"], "att", None, None)
    won = await storage.attach_content(message["id"], "blob-1", 10, "aa")
    assert won["content"] == {"size": 10, "sha256": "aa", "inline": False} and won["blob_id"] == "blob-1"
    lost = await storage.attach_content(message["id"], "blob-2", 11, "bb")
    assert lost["blob_id"] == "blob-1" and lost["content"]["sha256"] == "aa"
    last = (await storage.get_conversation(conv["id"]))["last_message"]
    assert last["content"]["sha256"] == "aa" and "blob_id" not in last and "ciphertext" not in last


async def test_presence_defaults_and_updates(storage):
    a, b, c = await make_users(storage, "abe", "bea", "cid")
    assert await storage.get_presences([a["id"], b["id"]]) == {}
    record = await storage.set_presence(a["id"], status="away")
    assert record == {"user_id": a["id"], "status": "away", "last_seen": None, "show_last_seen": True}
    seen = utcnow()
    record = await storage.set_presence(a["id"], last_seen=seen)
    assert record == {"user_id": a["id"], "status": "away", "last_seen": seen, "show_last_seen": True}
    record = await storage.set_presence(a["id"], show_last_seen=False)
    assert record == {"user_id": a["id"], "status": "away", "last_seen": seen, "show_last_seen": False}
    record = await storage.set_presence(a["id"], status="busy")
    assert record["show_last_seen"] is False and record["status"] == "busy"
    record = await storage.set_presence(a["id"], status="away")
    other = await storage.set_presence(c["id"], status="busy")
    assert await storage.get_presences([a["id"], b["id"], c["id"], "0" * 24]) == {a["id"]: record, c["id"]: other}
    assert await storage.get_presences([]) == {}


async def test_calls_busy_detection_and_compare_and_set(storage):
    a, b, c = await make_users(storage, "amy", "ben", "cal")
    deadline = utcnow() + timedelta(seconds=30)
    first = await storage.create_call(a["id"], b["id"], "audio", deadline)
    assert first["status"] == "pending" and first["answered_at"] is None
    second = await storage.create_call(c["id"], b["id"], "video", deadline)
    assert second["status"] == "busy" and second["ended_at"] is not None
    winners = await asyncio.gather(
        storage.transition_call(first["id"], ("pending",), "accepted", {"answered_at": utcnow()}),
        storage.transition_call(first["id"], ("pending",), "rejected", {"ended_at": utcnow()}),
        storage.transition_call(first["id"], ("pending",), "missed", {"ended_at": utcnow()}))
    assert sum(w is not None for w in winners) == 1
    assert [c["id"] for c in await storage.list_active_calls(b["id"])] == (
        [first["id"]] if winners[0] else [])
    assert await storage.transition_call("d" * 24, ("pending",), "accepted", {}) is None


async def test_call_history_and_due_calls(storage):
    a, b = await make_users(storage, "dan", "eve")
    past = utcnow() - timedelta(seconds=1)
    overdue = await storage.create_call(a["id"], b["id"], "audio", past)
    assert [c["id"] for c in await storage.due_pending_calls(utcnow())] == [overdue["id"]]
    await storage.transition_call(overdue["id"], ("pending",), "missed", {"ended_at": utcnow()})
    assert await storage.due_pending_calls(utcnow()) == []
    await tick()
    later = await storage.create_call(b["id"], a["id"], "video", utcnow() + timedelta(seconds=60))
    await storage.transition_call(later["id"], ("pending",), "rejected", {"ended_at": utcnow()})
    history = await storage.list_call_history(a["id"], limit=10)
    assert [c["id"] for c in history] == [later["id"], overdue["id"]]
    page2 = await storage.list_call_history(a["id"], limit=1,
                                            before=(history[0]["created_at"], history[0]["id"]))
    assert [c["id"] for c in page2] == [overdue["id"]]
    assert await storage.get_call(later["id"]) == history[0]


async def test_records_are_copies(storage):
    a, b = await make_users(storage, "fay", "gus")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    conv["participant_ids"].append("intruder")
    assert "intruder" not in (await storage.get_conversation(conv["id"]))["participant_ids"]
    message, _ = await storage.add_message(conv["id"], a["id"], "cp", None, None)
    message["seq"] = 99
    assert (await storage.get_message(message["id"]))["seq"] == 1
