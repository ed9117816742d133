"""Caches of membership and blocks never keep what a change made stale: a read
under way when the change lands is used once, not kept."""
from __future__ import annotations

import asyncio

import pytest

from tests.stall import StallableStorage

pytestmark = pytest.mark.gen_test(timeout=60)


@pytest.fixture
def storage(storage):
    return StallableStorage(storage)


async def test_a_slow_membership_read_overtaken_by_a_leave_is_not_kept(api, app, storage):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    group = await api.conversation(ta, bob, carol)
    rt = app.settings["kisse"]
    rt.members.forget(group["id"])
    storage.stall(only={"get_conversation"})
    slow = asyncio.ensure_future(rt.members.membership(group["id"]))  # reads the old membership, held
    while not storage.waiting:
        await asyncio.sleep(0.01)
    assert (await storage.inner.leave_conversation(group["id"], carol["id"])) is not None
    rt.bus.changed("conversation.changed", {"conversation_id": group["id"]})  # what membership.leave publishes
    storage.resume()
    await slow
    assert rt.members.peek(group["id"]) is None  # a read that began before the change is not kept
    status, body = await api.call("POST", "/api/messages", tc, {"conversation_id": group["id"],
                                                                "client_message_id": "after-leaving"})
    assert status == 404


async def test_a_slow_blocks_read_overtaken_by_a_block_is_not_kept(api, app, storage):
    ts, spammer = await api.register()
    tv, victim = await api.register()
    rt = app.settings["kisse"]
    storage.stall(only={"blockers_of"})
    slow = asyncio.ensure_future(rt.blocks.blockers(spammer["id"]))
    while not storage.waiting:
        await asyncio.sleep(0.01)
    assert (await api.call("POST", f"/api/users/{spammer['id']}/block", tv))[0] == 204
    storage.resume()
    await slow  # began before the block: used by its caller, not kept
    assert await rt.blocks.blockers(spammer["id"]) == {victim["id"]}
