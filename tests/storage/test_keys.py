"""The storage contract for the key directory (every backend): bundles per device,
one-time prekeys handed out once ever, all-or-none uploads, keys gone with their device."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from storage.base import PrekeyIdTaken, TooManyPrekeys, utcnow
from tests.storage.test_contract import make_users
from tests.storage.test_devices import device

pytestmark = pytest.mark.gen_test


def bundle(identity: bytes = b"\x05" + b"i" * 32) -> dict:
    return {"registration_id": 7, "identity_key": identity,
            "signed_prekey": {"key_id": 1, "public_key": b"\x05" + b"s" * 32, "signature": b"g" * 64},
            "pq_last_resort_prekey": {"key_id": 9, "public_key": b"\x08" + b"k" * 1568, "signature": b"h" * 64}}


def ec(*ids: int) -> list[dict]:
    return [{"key_id": i, "public_key": b"\x05" + bytes([i % 256]) * 32} for i in ids]


def pq(*ids: int) -> list[dict]:
    return [{"key_id": i, "public_key": b"\x08" + bytes([i % 256]) * 1568, "signature": b"p" * 64} for i in ids]


async def test_a_bundle_belongs_to_its_device_and_round_trips(storage):
    (alice,) = await make_users(storage, "alice")
    first, second = await device(storage, alice, 1), await device(storage, alice, 2)
    assert await storage.count_prekeys(first["session_id"]) is None  # no bundle yet
    assert await storage.set_key_bundle(second["session_id"], bundle()) == (True, None)
    found, = await storage.key_bundles(alice["id"])
    assert found == {**bundle(), "device_id": 2, "session_id": second["session_id"]}
    assert await storage.count_prekeys(second["session_id"]) == {"ec": 0, "pq": 0}
    # The same identity again (a signed prekey rotation) keeps the pools; a new one empties them.
    assert await storage.add_prekeys(second["session_id"], {"ec": ec(1, 2)}, 100)
    assert await storage.set_key_bundle(second["session_id"], bundle()) == (True, bundle()["identity_key"])
    assert await storage.count_prekeys(second["session_id"]) == {"ec": 2, "pq": 0}
    assert await storage.set_key_bundle(second["session_id"], bundle(b"\x05" + b"n" * 32)) == \
        (True, bundle()["identity_key"])
    assert await storage.count_prekeys(second["session_id"]) == {"ec": 0, "pq": 0}
    assert (await storage.key_bundles(alice["id"]))[0]["identity_key"] == b"\x05" + b"n" * 32
    assert await storage.set_key_bundle("no-such-session", bundle()) == (False, None)
    assert await storage.list_devices(alice["id"]) == [first, second]  # devices never show their keys


async def test_each_one_time_key_is_taken_once_ever_however_many_race(storage):
    (bob,) = await make_users(storage, "bob")
    phone = await device(storage, bob, 1)
    await storage.set_key_bundle(phone["session_id"], bundle())
    assert await storage.add_prekeys(phone["session_id"], {"ec": ec(*range(1, 11))}, 100)
    assert await storage.add_prekeys(phone["session_id"], {"pq": pq(*range(50, 55))}, 100)
    takes = await asyncio.gather(*(storage.take_prekey(phone["session_id"], "ec") for _ in range(25)))
    taken = [t["key_id"] for t in takes if t is not None]
    assert sorted(taken) == list(range(1, 11)) and takes.count(None) == 15
    assert await storage.take_prekey(phone["session_id"], "pq") == pq(50)[0]  # lowest id first, whole
    assert await storage.count_prekeys(phone["session_id"]) == {"ec": 0, "pq": 4}
    # A taken id may come back in a later upload: it is a new key.
    assert await storage.add_prekeys(phone["session_id"], {"ec": ec(3)}, 100)
    assert (await storage.take_prekey(phone["session_id"], "ec"))["key_id"] == 3


async def test_an_upload_is_all_or_none(storage):
    (carol,) = await make_users(storage, "carol")
    phone = await device(storage, carol, 1)
    sid = phone["session_id"]
    await storage.set_key_bundle(sid, bundle())
    assert await storage.add_prekeys(sid, {"ec": ec(1, 2, 3)}, 5)
    assert await storage.add_prekeys(sid, {"ec": ec(1, 2, 3)}, 5)  # a retried upload: kept once
    assert await storage.count_prekeys(sid) == {"ec": 3, "pq": 0}
    other = [{"key_id": 2, "public_key": b"\x05" + b"x" * 32}]
    with pytest.raises(PrekeyIdTaken):
        await storage.add_prekeys(sid, {"ec": ec(4) + other}, 5)  # another key under a held id
    with pytest.raises(PrekeyIdTaken) as taken:  # one pool refused: the other keeps nothing either
        await storage.add_prekeys(sid, {"pq": pq(7), "ec": other}, 5)
    assert taken.value.args[0] == "ec"
    with pytest.raises(TooManyPrekeys):
        await storage.add_prekeys(sid, {"ec": ec(4, 5, 6)}, 5)
    assert await storage.count_prekeys(sid) == {"ec": 3, "pq": 0}  # neither kept key 4
    assert await storage.add_prekeys(sid, {"pq": pq(1, 2)}, 5)  # the pools are separate: ids too
    assert await storage.count_prekeys(sid) == {"ec": 3, "pq": 2}


async def test_racing_uploads_never_pass_the_cap(storage):
    (dan,) = await make_users(storage, "dan")
    phone = await device(storage, dan, 1)
    await storage.set_key_bundle(phone["session_id"], bundle())
    uploads = [{"ec": ec(*range(10 * n, 10 * n + 10))} for n in range(1, 6)]
    results = await asyncio.gather(*(storage.add_prekeys(phone["session_id"], pools, 25) for pools in uploads),
                                   return_exceptions=True)
    assert all(r is True or isinstance(r, TooManyPrekeys) for r in results), results
    held = (await storage.count_prekeys(phone["session_id"]))["ec"]
    assert held == 10 * results.count(True) and held <= 25


async def test_a_revoked_device_leaves_the_directory_with_its_keys(storage):
    (erin,) = await make_users(storage, "erin")
    first, second = await device(storage, erin, 1), await device(storage, erin, 2)
    for phone in (first, second):
        await storage.set_key_bundle(phone["session_id"], bundle())
        await storage.add_prekeys(phone["session_id"], {"ec": ec(1, 2)}, 10)
    await storage.revoke_devices(erin["id"], device_id=1)
    assert [b["device_id"] for b in await storage.key_bundles(erin["id"])] == [2]
    assert await storage.take_prekey(first["session_id"], "ec") is None
    assert await storage.count_prekeys(first["session_id"]) is None
    assert await storage.add_prekeys(first["session_id"], {"ec": ec(5)}, 10) is False  # nothing kept
    assert await storage.take_prekey(first["session_id"], "ec") is None
    # Its id goes to the next device, which starts with an empty directory entry.
    third = await device(storage, erin, 3)
    assert third["device_id"] == 1 and await storage.count_prekeys(third["session_id"]) is None
    await storage.delete_user(erin["id"])
    assert await storage.key_bundles(erin["id"]) == []
    assert await storage.take_prekey(second["session_id"], "ec") is None


async def test_who_shares_a_conversation_and_who_accepted_it(storage):
    a, b, c = await make_users(storage, "ann", "ben", "cy")
    assert not await storage.shares_conversation(a["id"], b["id"])
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])  # a request to ben
    assert await storage.shares_conversation(a["id"], b["id"]) and await storage.shares_conversation(b["id"], a["id"])
    assert await storage.shares_conversation(b["id"], a["id"], accepted_by=a["id"])
    assert not await storage.shares_conversation(a["id"], b["id"], accepted_by=b["id"])
    await storage.accept_conversation(conv["id"], b["id"])
    assert await storage.shares_conversation(a["id"], b["id"], accepted_by=b["id"])
    assert not await storage.shares_conversation(a["id"], c["id"])
    await storage.leave_conversation(conv["id"], b["id"])
    assert not await storage.shares_conversation(a["id"], b["id"])


async def test_a_device_whose_session_expired_leaves_the_directory(storage):
    (fay,) = await make_users(storage, "fay")
    gone = await storage.create_device(fay["id"], "old phone", "hash-old", utcnow() + timedelta(milliseconds=50), 10)
    kept = await device(storage, fay, 2)
    for phone in (gone, kept):
        await storage.set_key_bundle(phone["session_id"], bundle())
    await asyncio.sleep(0.1)
    assert [b["device_id"] for b in await storage.key_bundles(fay["id"])] == [kept["device_id"]]
