"""The storage contract for devices, their sessions and account deletion (every backend)."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from storage.base import BlobNotFound, TooManyDevices, UsernameTaken, utcnow
from tests.storage.test_contract import make_users

pytestmark = pytest.mark.gen_test
LATER = timedelta(days=90)


async def device(storage, user, n, max_devices=10):
    return await storage.create_device(user["id"], f"phone {n}", f"hash-{user['id']}-{n}", utcnow() + LATER,
                                       max_devices)


async def test_devices_take_the_lowest_free_id_and_give_it_back(storage):
    (alice,) = await make_users(storage, "alice")
    first, second, third = [await device(storage, alice, n) for n in range(3)]
    assert [d["device_id"] for d in (first, second, third)] == [1, 2, 3]
    assert set(first) == {"user_id", "device_id", "name", "created_at", "last_seen_at", "session_id", "rotated_at"}
    assert first["name"] == "phone 0" and first["session_id"] != second["session_id"]
    assert [d["device_id"] for d in await storage.revoke_devices(alice["id"], device_id=2)] == [2]
    assert [d["device_id"] for d in await storage.list_devices(alice["id"])] == [1, 3]
    assert await storage.get_session(second["session_id"]) is None  # revoked: gone at once
    again = await device(storage, alice, 9)
    assert again["device_id"] == 2 and again["session_id"] != second["session_id"]


async def test_the_device_cap_holds_even_when_logins_race(storage):
    (bob,) = await make_users(storage, "bob")
    results = await asyncio.gather(*(device(storage, bob, n, max_devices=5) for n in range(10)),
                                   return_exceptions=True)
    made = [r for r in results if isinstance(r, dict)]
    assert len(made) == 5 and sorted(d["device_id"] for d in made) == [1, 2, 3, 4, 5]
    refused = [r for r in results if isinstance(r, TooManyDevices)]
    assert len(refused) == 5 and all(len(r.devices) == 5 for r in refused)
    assert len(await storage.list_devices(bob["id"])) == 5


async def test_sessions_are_found_touched_and_revoked(storage):
    alice, bob = await make_users(storage, "alice", "bob")
    mine = [await device(storage, alice, n) for n in range(3)]
    theirs = await device(storage, bob, 0)
    session = await storage.get_session(mine[0]["session_id"])
    assert session == mine[0]
    seen = utcnow() + timedelta(minutes=5)
    await storage.touch_device(mine[0]["session_id"], seen)
    assert (await storage.get_session(mine[0]["session_id"]))["last_seen_at"] == seen
    kept = await storage.revoke_devices(alice["id"], keep_session=mine[1]["session_id"])
    assert sorted(d["device_id"] for d in kept) == [1, 3]
    assert [d["device_id"] for d in await storage.list_devices(alice["id"])] == [2]
    assert await storage.get_session(theirs["session_id"]) is not None  # another user's: untouched


async def test_refresh_rotation_is_one_atomic_step(storage):
    (alice,) = await make_users(storage, "alice")
    mine = await device(storage, alice, 0)
    now = utcnow()
    state, rotated = await storage.rotate_refresh(f"hash-{alice['id']}-0", "second", now + LATER, now)
    assert state == "rotated" and rotated["session_id"] == mine["session_id"] and rotated["rotated_at"] == now
    assert await storage.rotate_refresh(f"hash-{alice['id']}-0", "x", now + LATER, now) == ("spent", rotated)
    assert await storage.rotate_refresh("garbage", "x", now + LATER, now) == ("unknown", None)
    results = await asyncio.gather(*(storage.rotate_refresh("second", f"third-{n}", now + LATER, now)
                                     for n in range(8)))
    assert [state for state, _ in results].count("rotated") == 1  # of racing refreshes, exactly one wins
    assert {state for state, _ in results} == {"rotated", "spent"}
    winner = next(n for n, (state, _) in enumerate(results) if state == "rotated")
    later = now + LATER + timedelta(seconds=1)
    state, expired = await storage.rotate_refresh(f"third-{winner}", "x", later + LATER, later)
    assert state == "expired" and expired["session_id"] == mine["session_id"]


async def test_deleting_an_account_erases_it_but_keeps_the_name_and_the_seqs(storage):
    alice, bob = await make_users(storage, "alice", "bob")
    await device(storage, alice, 0)
    conversation, _ = await storage.get_or_create_direct(alice["id"], bob["id"])
    inline, _ = await storage.add_message(conversation["id"], alice["id"], "a1", b"secret", {
        "size": 6, "sha256": "s", "inline": True})
    uploaded, _ = await storage.add_message(conversation["id"], alice["id"], "a2", None, None)
    writer = await storage.open_blob_writer(1024)
    await writer.write(b"attachment")
    await writer.finish()
    await storage.attach_content(uploaded["id"], writer.blob_id, 10, "t")
    reply, _ = await storage.add_message(conversation["id"], bob["id"], "b1", b"hi", {
        "size": 2, "sha256": "u", "inline": True})
    await storage.set_presence(alice["id"], status="busy")
    await storage.delete_user(alice["id"])
    assert await storage.get_credentials("alice") is None
    with pytest.raises(UsernameTaken):  # reserved: nobody can pose as her to her old contacts
        await storage.create_user("alice", "h", "Impostor")
    assert await storage.search_users("al", limit=5) == []
    gone = await storage.get_user(alice["id"])
    assert gone["deleted"] and gone["username"] == "alice" and gone["display_name"] != "Alice"
    assert await storage.list_devices(alice["id"]) == []
    assert await storage.get_presences([alice["id"]]) == {}
    history, _ = await storage.list_messages(conversation["id"], after=0)
    assert [m["seq"] for m in history] == [1, 2, 3]
    for message in history[:2]:
        assert message["tombstone"] == "sender_deleted" and message["sender_id"] == alice["id"]
        assert message["ciphertext"] is None and message["content"] is None
    assert history[2]["ciphertext"] == b"hi" and history[2]["tombstone"] is None
    with pytest.raises(BlobNotFound):  # the attachment's bytes are gone
        await anext(storage.read_blob(writer.blob_id))
    await storage.delete_user(alice["id"])  # again: nothing changes, nothing breaks


async def test_a_device_whose_refresh_token_expired_holds_no_slot(storage):
    (carl,) = await make_users(storage, "carl")
    await storage.create_device(carl["id"], "old phone", "old-hash", utcnow() - timedelta(seconds=1), 1)
    fresh = await device(storage, carl, 1, max_devices=1)
    assert fresh["device_id"] == 1 and [d["name"] for d in await storage.list_devices(carl["id"])] == ["phone 1"]
