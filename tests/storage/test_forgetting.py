"""The storage contract for forgetting (every backend): disappearing messages gone for
every read the moment they expire and from storage at the next sweep, blobs with them;
retention of old messages and calls; one sweeper per cluster."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from storage.base import BlobNotFound, utcnow
from tests.storage.test_contract import make_users

pytestmark = pytest.mark.gen_test


async def blob(storage, data: bytes) -> str:
    writer = await storage.open_blob_writer(1 << 20)
    await writer.write(data)
    await writer.finish()
    return writer.blob_id


async def test_an_expired_message_is_gone_for_reads_then_from_storage(storage):
    a, b = await make_users(storage, "ann", "ben")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    assert conv["message_ttl"] is None
    assert (await storage.set_message_ttl(conv["id"], 1))["message_ttl"] == 1
    assert (await storage.get_conversation(conv["id"]))["message_ttl"] == 1
    keep, _ = await storage.add_message(conv["id"], a["id"], "keep", b"k", None)
    assert keep["expires_at"] is None
    short, _ = await storage.add_message(conv["id"], a["id"], "short", b"s", None, ttl=1)
    assert short["expires_at"] == short["created_at"] + timedelta(seconds=1)
    uploaded, _ = await storage.add_message(conv["id"], a["id"], "file", None, None, ttl=1)
    blob_id = await blob(storage, b"secret bytes")
    await storage.attach_content(uploaded["id"], blob_id, 12, "ab")
    assert (await storage.get_conversation(conv["id"]))["last_message"]["id"] == uploaded["id"]
    assert await storage.count_unread(conv["id"], b["id"], 0) == 3
    await asyncio.sleep(1.05)
    # Expired: no read shows them, before any sweep.
    assert await storage.get_message(short["id"]) is None
    page, more = await storage.list_messages(conv["id"], after=0)
    assert [m["seq"] for m in page] == [1] and not more
    assert [m["seq"] for m in (await storage.list_messages(conv["id"]))[0]] == [1]
    assert await storage.count_unread(conv["id"], b["id"], 0) == 1
    # The sweep: ciphertext, blob and record gone; last_message back to what is left.
    assert await storage.forget_messages(utcnow()) == 2
    assert await storage.forget_messages(utcnow()) == 0
    with pytest.raises(BlobNotFound):
        async for _ in storage.read_blob(blob_id):
            pass
    last = (await storage.get_conversation(conv["id"]))["last_message"]
    assert last["id"] == keep["id"] and (await storage.get_conversation(conv["id"]))["last_seq"] == 3
    # Numbering goes on after the hole; a page fills itself past it.
    later, _ = await storage.add_message(conv["id"], b["id"], "later", b"l", None)
    assert later["seq"] == 4
    assert [m["seq"] for m in (await storage.list_messages(conv["id"], after=0, limit=2))[0]] == [1, 4]
    assert [m["seq"] for m in (await storage.list_messages(conv["id"], before=4, limit=2))[0]] == [1]


async def test_a_conversation_whose_every_message_expired_has_no_last_message(storage):
    a, b = await make_users(storage, "cat", "dan")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    for n in range(3):
        await storage.add_message(conv["id"], a["id"], f"m{n}", b"x", None, ttl=1)
    await asyncio.sleep(1.05)
    assert await storage.forget_messages(utcnow(), limit=2) == 2  # batches: call again while full
    assert await storage.forget_messages(utcnow(), limit=2) == 1
    assert (await storage.get_conversation(conv["id"]))["last_message"] is None


async def test_retention_forgets_old_messages_and_calls(storage):
    a, b = await make_users(storage, "eve", "fox")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    old, _ = await storage.add_message(conv["id"], a["id"], "old", b"o", None)
    call = await storage.create_call(a["id"], b["id"], "audio", utcnow() + timedelta(seconds=30))
    await storage.transition_call(call["id"], ("pending",), "ended", {"ended_at": utcnow(), "end_reason": "hangup"})
    live = await storage.create_call(a["id"], b["id"], "audio", utcnow() + timedelta(seconds=30))
    await asyncio.sleep(0.02)
    cutoff = utcnow()
    new, _ = await storage.add_message(conv["id"], a["id"], "new", b"n", None)
    assert await storage.forget_messages(utcnow(), created_before=cutoff) == 1
    assert [m["id"] for m in (await storage.list_messages(conv["id"]))[0]] == [new["id"]]
    assert await storage.get_message(old["id"]) is None
    assert await storage.forget_calls(cutoff) == 1
    assert await storage.get_call(call["id"]) is None and await storage.get_call(live["id"]) is not None


async def test_one_sweeper_holds_the_lease(storage):
    assert await storage.take_lease("sweep", "node-1", 0.3)
    assert await storage.take_lease("sweep", "node-1", 0.3)  # renewed by its holder
    assert not await storage.take_lease("sweep", "node-2", 0.3)
    await asyncio.sleep(0.35)
    assert await storage.take_lease("sweep", "node-2", 0.3)  # the holder went quiet
    assert not await storage.take_lease("sweep", "node-1", 0.3)
