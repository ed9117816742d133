"""The storage contract for message requests, membership changes and blocks (every backend)."""
from __future__ import annotations

import asyncio

import pytest

from tests.storage.test_contract import make_users, tick

pytestmark = pytest.mark.gen_test


async def ids(storage, user_id, filter):
    return [c["id"] for c in await storage.list_conversations(user_id, limit=50, filter=filter)]


async def test_a_direct_conversation_is_a_request_for_the_other_until_accepted(storage):
    a, b = await make_users(storage, "ann", "ben")
    conv, created = await storage.get_or_create_direct(a["id"], b["id"])
    assert created and conv["requests"] == [b["id"]] and conv["admins"] == [] and conv["former"] == []
    assert await ids(storage, b["id"], "requests") == [conv["id"]] and await ids(storage, b["id"], "accepted") == []
    assert await ids(storage, a["id"], "accepted") == [conv["id"]] and await ids(storage, a["id"], "requests") == []
    assert await ids(storage, b["id"], "all") == [conv["id"]]
    assert await storage.contact_ids(a["id"]) == set() == await storage.contact_ids(b["id"])
    # Creating it again is no new request, and the other creating it accepts it.
    again, created = await storage.get_or_create_direct(a["id"], b["id"])
    assert not created and again["requests"] == [b["id"]]
    accepted, _ = await storage.get_or_create_direct(b["id"], a["id"])
    assert accepted["requests"] == [] and await storage.contact_ids(a["id"]) == {b["id"]}
    assert await storage.accept_conversation(conv["id"], b["id"]) == accepted  # idempotent
    outsider, = await make_users(storage, "cy")
    assert await storage.accept_conversation(conv["id"], outsider["id"]) is None


async def test_a_declined_direct_conversation_comes_back_as_a_new_request(storage):
    a, b = await make_users(storage, "ann", "ben")
    conv, _ = await storage.get_or_create_direct(a["id"], b["id"])
    await storage.add_message(conv["id"], a["id"], "hello", b"x", None)
    left = await storage.leave_conversation(conv["id"], b["id"])
    assert left["participant_ids"] == [a["id"]] and left["requests"] == []
    assert [(f["user_id"], f["up_to_seq"], f["title"]) for f in left["former"]] == [(b["id"], 1, None)]
    assert left["former"][0]["left_at"] >= conv["created_at"]
    assert await ids(storage, b["id"], "all") == []
    assert await storage.leave_conversation(conv["id"], b["id"]) is None  # not a member any more
    back, created = await storage.get_or_create_direct(a["id"], b["id"])
    assert not created and back["id"] == conv["id"]
    assert back["participant_ids"] == [a["id"], b["id"]] and back["requests"] == [b["id"]] and back["former"] == []
    # The one who left re-joins by creating it: accepted.
    await storage.leave_conversation(conv["id"], a["id"])
    rejoined, _ = await storage.get_or_create_direct(a["id"], b["id"])
    assert rejoined["participant_ids"] == [b["id"], a["id"]] and rejoined["requests"] == [b["id"]]


async def test_a_group_has_its_creator_as_admin_and_requests_for_everyone_else(storage):
    a, b, c, d, e = await make_users(storage, "ann", "ben", "cy", "dee", "eve")
    group = await storage.create_group(a["id"], [a["id"], b["id"], c["id"]], "Trip")
    assert group["admins"] == [a["id"]] and group["requests"] == [b["id"], c["id"]]
    await storage.accept_conversation(group["id"], c["id"])
    assert await storage.contact_ids(c["id"]) == {a["id"]} and await storage.contact_ids(b["id"]) == set()
    changed, added = await storage.add_members(group["id"], [d["id"], b["id"], d["id"]], max_members=5)
    assert added == [d["id"]] and changed["participant_ids"] == [a["id"], b["id"], c["id"], d["id"]]
    assert changed["requests"] == [b["id"], d["id"]]
    assert changed == await storage.get_conversation(group["id"])
    with pytest.raises(ValueError):
        await storage.add_members(group["id"], [e["id"], "f" * 24], max_members=5)
    assert (await storage.get_conversation(group["id"]))["participant_ids"] == [a["id"], b["id"], c["id"], d["id"]]
    assert await storage.add_members("0" * 24, [e["id"]], max_members=5) is None
    titled = await storage.set_title(group["id"], "Trip 2")
    assert titled["title"] == "Trip 2" and await storage.set_title("0" * 24, "x") is None
    promoted = await storage.set_admin(group["id"], c["id"], True)
    assert promoted["admins"] == [a["id"], c["id"]]
    assert (await storage.set_admin(group["id"], c["id"], False))["admins"] == [a["id"]]
    assert await storage.set_admin(group["id"], e["id"], True) is None


async def test_the_last_admin_leaving_hands_the_group_to_its_longest_standing_accepted_member(storage):
    a, b, c, d = await make_users(storage, "ann", "ben", "cy", "dee")
    group = await storage.create_group(a["id"], [a["id"], b["id"], c["id"], d["id"]], None)
    await storage.accept_conversation(group["id"], c["id"])
    await storage.add_message(group["id"], a["id"], "one", b"x", None)
    after = await storage.leave_conversation(group["id"], a["id"])
    assert after["admins"] == [c["id"]]  # b joined first but has not accepted
    assert [(f["user_id"], f["up_to_seq"]) for f in after["former"]] == [(a["id"], 1)]
    # Nobody accepted: the longest-standing member.
    group2 = await storage.create_group(a["id"], [a["id"], b["id"], d["id"]], None)
    assert (await storage.leave_conversation(group2["id"], a["id"]))["admins"] == [b["id"]]
    # Re-added: out of `former`, a request again.
    back, added = await storage.add_members(group["id"], [a["id"]], max_members=10)
    assert added == [a["id"]] and back["former"] == [] and a["id"] in back["requests"]


async def test_racing_membership_changes_all_apply(storage):
    users = await make_users(storage, *[f"u{i}" for i in range(10)])
    a = users[0]
    group = await storage.create_group(a["id"], [u["id"] for u in users[:5]], None)
    await asyncio.gather(
        storage.add_members(group["id"], [users[5]["id"], users[6]["id"]], max_members=50),
        storage.leave_conversation(group["id"], users[1]["id"]),
        storage.add_members(group["id"], [users[7]["id"]], max_members=50),
        storage.leave_conversation(group["id"], users[2]["id"]),
        storage.accept_conversation(group["id"], users[3]["id"]),
        storage.add_members(group["id"], [users[8]["id"], users[9]["id"]], max_members=50),
        storage.set_admin(group["id"], users[4]["id"], True))
    final = await storage.get_conversation(group["id"])
    expected = {u["id"] for u in users} - {users[1]["id"], users[2]["id"]}
    assert set(final["participant_ids"]) == expected and len(final["participant_ids"]) == len(expected)
    assert set(final["requests"]) == expected - {a["id"], users[3]["id"]}
    assert set(final["admins"]) == {a["id"], users[4]["id"]}
    assert {f["user_id"] for f in final["former"]} == {users[1]["id"], users[2]["id"]}
    for user in users:
        listed = await ids(storage, user["id"], "all")
        assert listed == ([group["id"]] if user["id"] in expected else [])


async def test_blocks_cut_contacts_both_ways_and_are_listed_newest_first(storage):
    a, b, c = await make_users(storage, "ann", "ben", "cy")
    group = await storage.create_group(a["id"], [a["id"], b["id"], c["id"]], None)
    for user in (b, c):
        await storage.accept_conversation(group["id"], user["id"])
    assert await storage.contact_ids(a["id"]) == {b["id"], c["id"]}
    await storage.block_user(b["id"], a["id"])
    await tick()
    await storage.block_user(b["id"], c["id"])
    await storage.block_user(b["id"], a["id"])  # idempotent: keeps its first time
    blocks = await storage.list_blocks(b["id"])
    assert [x["user_id"] for x in blocks] == [c["id"], a["id"]] and blocks[1]["blocked_at"] < blocks[0]["blocked_at"]
    assert await storage.blockers_of(a["id"]) == {b["id"]} and await storage.blockers_of(b["id"]) == set()
    assert await storage.contact_ids(a["id"]) == {c["id"]}  # blocked by b
    assert await storage.contact_ids(b["id"]) == set()      # b blocked both
    await storage.unblock_user(b["id"], a["id"])
    await storage.unblock_user(b["id"], a["id"])
    assert await storage.contact_ids(a["id"]) == {b["id"], c["id"]}
    assert [x["user_id"] for x in await storage.list_blocks(b["id"])] == [c["id"]]


async def test_senders_between_names_who_sent_in_a_seq_range(storage):
    a, b, c = await make_users(storage, "ann", "ben", "cy")
    group = await storage.create_group(a["id"], [a["id"], b["id"], c["id"]], None)
    for n, user in enumerate((a, b, a, c)):
        await storage.add_message(group["id"], user["id"], f"m{n}", b"x", None)
    assert await storage.senders_between(group["id"], 0, 4) == {a["id"], b["id"], c["id"]}
    assert await storage.senders_between(group["id"], 1, 3) == {a["id"], b["id"]}
    assert await storage.senders_between(group["id"], 2, 3) == {a["id"]}
    assert await storage.senders_between(group["id"], 4, 9) == set()
