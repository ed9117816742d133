"""Users, conversations, messages and receipts: one function per action,
shared by the REST handlers and the WebSocket."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from kisse import contacts, presence
from kisse.bus import CONVERSATION_CHANGED
from kisse.errors import BadRequest, Conflict, NotFound
from kisse.members import Membership
from kisse.runtime import Runtime
from kisse.views import blocked_view, iso, member_view, message_view, page_cursor, presence_view, user_view
from storage.base import Record, ReceiptKind, utcnow

HISTORY_DEFAULT, HISTORY_MAX = 50, 200
# Sends whose storage call failed, remembered so that a retry finding the message
# stored publishes it (the failed attempt could not); a retry comes within minutes.
UNCONFIRMED_MEMORY = 10_000


# -- users --------------------------------------------------------------------
async def search_users(rt: Runtime, query: str, limit: int, after: str | None) -> dict[str, Any]:
    users = await rt.storage.search_users(query.lower(), limit + 1, after.lower() if after else None)
    page = users[:limit]
    return {"users": [user_view(u) for u in page],
            "next_after": page[-1]["username"].lower() if len(users) > limit else None}


async def get_user(rt: Runtime, user_id: str) -> dict[str, Any]:
    user = await rt.storage.get_user(user_id)
    if user is None:
        raise NotFound("no such user", code="user_not_found")
    return user_view(user)


# -- conversations --------------------------------------------------------------
def no_conversation() -> NotFound:
    return NotFound("no such conversation", code="conversation_not_found")


def former_entry(conversation: Record, user_id: str) -> Record | None:
    """`{user_id, up_to_seq}` if the user left this conversation (or was removed)."""
    return next((f for f in conversation["former"] if f["user_id"] == user_id), None)


async def member_conversation(rt: Runtime, user_id: str, conversation_id: str, former: bool = False) -> Record:
    """The conversation if `user_id` belongs to it (or, with `former`, did: they may
    still read it up to when they left); 404 alike for absent and foreign ones."""
    conversation = await rt.storage.get_conversation(conversation_id)
    if conversation is not None and (user_id in conversation["participant_ids"]
                                     or former and former_entry(conversation, user_id)):
        return conversation
    raise no_conversation()


async def membership_of(rt: Runtime, user_id: str, conversation_id: str) -> Membership:
    """The conversation's membership if `user_id` is a member; 404 alike otherwise."""
    # peek first: the hot path (every send) then costs no coroutine when the membership is cached
    membership = rt.members.peek(conversation_id) or await rt.members.membership(conversation_id)
    if membership is None or user_id not in membership.ids:
        raise no_conversation()
    return membership


def membership_changed(rt: Runtime, conversation: Record) -> None:
    """Every process (this one too) forgets the conversation's cached membership."""
    rt.bus.changed(CONVERSATION_CHANGED, {"conversation_id": conversation["id"]})


async def check_reachable(rt: Runtime, user_id: str, others: list[str]) -> None:
    """400 `unknown_participants` for ids that are nobody, deleted, or users who blocked
    `user_id`: a blocked user cannot tell a block from a wrong id."""
    found = {u["id"] for u in await rt.storage.get_users(others) if not u["deleted"]}
    blockers = await rt.blocks.blockers(user_id)
    unknown = [m for m in others if m not in found or m in blockers]
    if unknown:
        raise BadRequest(f"unknown participant ids: {', '.join(unknown)}", code="unknown_participants",
                         details={"participant_ids": unknown})


async def create_conversation(rt: Runtime, user_id: str, participant_ids: list[str],
                              title: str | None) -> tuple[dict[str, Any], bool]:
    """A direct conversation (two people, unique per pair) or a group. Everyone but
    the creator gets it as a request (`conversation.request`)."""
    members = list(dict.fromkeys([user_id, *participant_ids]))
    if len(members) < 2:
        raise BadRequest("a conversation needs at least one other participant", code="too_few_participants")
    if len(members) > rt.settings.max_group_members:
        raise BadRequest(f"a conversation has at most {rt.settings.max_group_members} members",
                         code="too_many_participants")
    await check_reachable(rt, user_id, members[1:])
    if len(members) == 2:
        conversation, created = await rt.storage.get_or_create_direct(user_id, members[1])
        # A new request for the other side if they were not in it (new, declined, left);
        # a conversation this process has not cached may repeat one, which is harmless.
        known = rt.members.peek(conversation["id"])
        invited = [members[1]] if created or (members[1] in conversation["requests"] and (
            known is None or members[1] not in known.ids)) else []
    else:
        conversation, created = await rt.storage.create_group(user_id, members, title), True
        invited = members[1:]
    if created:
        rt.members.remember(conversation)
    elif known is None or known != Membership.of(conversation):  # re-joined, re-invited, accepted
        membership_changed(rt, conversation)
    view = await conversation_view(rt, conversation, user_id)
    if created:
        rt.bus.send([user_id], "conversation.new", view)
    await send_requests(rt, conversation, invited)
    return view, created


async def send_requests(rt: Runtime, conversation: Record, invitees: list[str]) -> None:
    """`conversation.request` to each invitee, with the view they see.

    Every view lists every member, so a group's fan-out is quadratic: one read of
    the members serves all the views, and the loop is given back after each one
    (memory storage never suspends), so a 256-member group never holds the loop
    for the whole fan-out (it did for 0.3 s, and 4.5 s at 1,001 members)."""
    users, presences = await _members(rt, conversation["participant_ids"])
    for invitee in invitees:
        [view] = await _views(rt, [conversation], invitee, users, presences)
        rt.bus.send([invitee], "conversation.request", view)
        await asyncio.sleep(0)


async def conversation_view(rt: Runtime, conversation: Record, viewer_id: str) -> dict[str, Any]:
    """A conversation as `viewer_id` sees it: participants with presence, last message, unread."""
    return (await conversation_views(rt, [conversation], viewer_id))[0]


async def conversation_views(rt: Runtime, conversations: list[Record], viewer_id: str) -> list[dict[str, Any]]:
    """`conversation_view` of each, with one read of users and one of presence for them all."""
    users, presences = await _members(rt, list(dict.fromkeys(m for c in conversations for m in c["participant_ids"])))
    return await _views(rt, conversations, viewer_id, users, presences)


async def _members(rt: Runtime, member_ids: list[str]) -> tuple[dict[str, Record], dict[str, Record]]:
    """The members' user records and stored presence, by id."""
    users = {u["id"]: u for u in await rt.storage.get_users(member_ids)}
    return users, await rt.storage.get_presences(member_ids)


async def _views(rt: Runtime, conversations: list[Record], viewer_id: str, users: dict[str, Record],
                 presences: dict[str, Record]) -> list[dict[str, Any]]:
    member_ids = list(dict.fromkeys(m for c in conversations for m in c["participant_ids"]))
    viewer_contacts = await rt.storage.contact_ids(viewer_id)
    present = await rt.presence.present_among([m for m in member_ids if m in viewer_contacts or m == viewer_id])
    hidden = await rt.blocks.blocked(viewer_id)
    return [await _conversation_view(rt, c, viewer_id, users, presences, viewer_contacts, present, hidden)
            for c in conversations]


async def _conversation_view(rt: Runtime, conversation: Record, viewer_id: str, users: dict[str, Record],
                             presences: dict[str, Record], viewer_contacts: set[str],
                             present: set[str], hidden: frozenset[str]) -> dict[str, Any]:
    admins = set(conversation["admins"])

    def shown_presence(user: Record) -> dict[str, Any] | None:
        if user["deleted"]:
            return presence_view(user["id"], "offline", None)
        if user["id"] != viewer_id and user["id"] not in viewer_contacts:
            return None  # the contact boundary: not "offline", just not yours to see
        return presence.shown(presences.get(user["id"]), user["id"], user["id"] in present)

    former = former_entry(conversation, viewer_id) if viewer_id not in conversation["participant_ids"] else None
    if former is not None:
        # Someone who left sees the conversation as it was when they left, nothing since.
        return {"id": conversation["id"], "kind": conversation["kind"], "title": former.get("title"),
                "created_by": conversation["created_by"], "created_at": iso(conversation["created_at"]),
                "last_activity_at": iso(former.get("left_at") or conversation["created_at"]),
                "last_seq": former["up_to_seq"], "participants": [],
                "membership": {"state": "left", "role": "member", "up_to_seq": former["up_to_seq"]},
                "last_message": None, "unread_count": 0, "message_ttl": None}
    participants = [{**member_view(user), "role": "admin" if user["id"] in admins else "member",
                     "presence": shown_presence(user)}
                    for user in (users.get(m) for m in conversation["participant_ids"]) if user is not None]
    membership = {"state": "request" if viewer_id in conversation["requests"] else "accepted",
                  "role": "admin" if viewer_id in admins else "member"}
    receipt = (await rt.storage.get_receipts(conversation["id"])).get(viewer_id)
    read_seq = receipt["read_seq"] if receipt else 0
    unread = (await rt.storage.count_unread(conversation["id"], viewer_id, read_seq, hidden)
              if conversation["last_seq"] > read_seq else 0)
    last = conversation["last_message"]
    if last is not None and last.get("expires_at") is not None and last["expires_at"] <= utcnow():
        last = None  # expired: the sweep points last_message at what is left in a moment
    last_view = None if last is None else blocked_view(last) if last["sender_id"] in hidden else message_view(last)
    return {"id": conversation["id"], "kind": conversation["kind"], "title": conversation["title"],
            "created_by": conversation["created_by"], "created_at": iso(conversation["created_at"]),
            "last_activity_at": iso(conversation["last_activity_at"]),
            "last_seq": conversation["last_seq"], "participants": participants, "membership": membership,
            "last_message": last_view, "unread_count": unread, "message_ttl": conversation.get("message_ttl")}


async def list_conversations(rt: Runtime, user_id: str, limit: int, before: tuple[datetime, str] | None,
                             filter: str = "accepted") -> dict[str, Any]:
    conversations = await rt.storage.list_conversations(user_id, limit + 1, before, filter=filter)
    page = conversations[:limit]
    cursor = page_cursor(page[-1]["last_activity_at"], page[-1]["id"]) if len(conversations) > limit else None
    return {"conversations": await conversation_views(rt, page, user_id), "next_before": cursor}


# -- messages -----------------------------------------------------------------
def decode_ciphertext(rt: Runtime, encoded: str | None) -> bytes | None:
    if encoded is None:
        return None
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("ciphertext must be standard base64", code="invalid_ciphertext") from None
    if len(data) > rt.settings.max_inline_ciphertext:
        raise BadRequest(f"inline ciphertext is over {rt.settings.max_inline_ciphertext} bytes; "
                         "upload it to /api/messages/{id}/content instead", code="ciphertext_too_large")
    return data


async def send_message(rt: Runtime, user_id: str, conversation_id: str, client_message_id: str,
                       ciphertext: str | None, origin_conn: str | None = None) -> tuple[dict[str, Any], bool]:
    """Store a message (or find the one already sent with this client id) and push it live.

    Returns `(message, created)`. The new message goes to every member's
    connections but the one it came from.
    """
    await rt.limits.hit("send", user_id)
    data = decode_ciphertext(rt, ciphertext)
    membership = await membership_of(rt, user_id, conversation_id)
    if membership.kind == "direct" and len(membership.ids) < 2:
        raise Conflict("the other side left this conversation", code="conversation_closed")
    if user_id in membership.requests:  # replying accepts
        from kisse import membership as changes
        await changes.accept(rt, user_id, conversation_id)
    members = membership.ids
    content = ({"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "inline": True}
               if data is not None else None)
    key = (user_id, client_message_id)
    rt.sending.add(key)
    try:
        message, created = await rt.storage.add_message(conversation_id, user_id, client_message_id, data, content,
                                                        ttl=membership.message_ttl)
    except BaseException:
        # Maybe stored, maybe not: its retry publishes what this attempt could not.
        rt.unconfirmed_sends[key] = None
        if len(rt.unconfirmed_sends) > UNCONFIRMED_MEMORY:
            del rt.unconfirmed_sends[next(iter(rt.unconfirmed_sends))]
        raise
    finally:
        rt.sending.discard(key)
    if message["conversation_id"] != conversation_id:
        raise Conflict("client_message_id was already used in another conversation",
                       code="client_message_id_reused")
    view = message_view(message)
    republish = not created and key in rt.unconfirmed_sends
    rt.unconfirmed_sends.pop(key, None)
    if created:
        rt.metrics.messages.inc()
    if created or republish:
        _, blockers = await rt.blocks.both(user_id)
        audience = [m for m in members if m not in blockers] if blockers else members
        rt.bus.send(audience, "message.new", view, exclude_conn=origin_conn)
    return view, created


async def repair_sends(rt: Runtime) -> int:
    """Finish sends abandoned part-way (their process died, nobody retried) and publish them."""
    older_than = utcnow() - timedelta(seconds=rt.settings.send_repair_after)
    repaired = await rt.storage.repair_sends(older_than, set(rt.sending))
    for message in repaired:
        membership = await rt.members.membership(message["conversation_id"])
        blockers = await rt.blocks.blockers(message["sender_id"])
        rt.metrics.messages.inc()
        rt.bus.send([m for m in membership.ids if m not in blockers] if membership else (), "message.new",
                    message_view(message))
    return len(repaired)


async def member_message(rt: Runtime, user_id: str, message_id: str) -> tuple[Record, Membership]:
    """`(message, its conversation's membership)` if the user is a member; 404 alike otherwise."""
    message = await rt.storage.get_message(message_id)
    if message is not None:
        conversation_id = message["conversation_id"]
        membership = rt.members.peek(conversation_id) or await rt.members.membership(conversation_id)
        if membership is not None and user_id in membership.ids:
            return message, membership
    raise NotFound("no such message", code="message_not_found")


async def readable_message(rt: Runtime, user_id: str, message_id: str) -> Record:
    """A message whose content the user may read: in a conversation they belong to,
    or belonged to when it was sent (someone who left keeps what came before), and
    not from someone they blocked; 404 alike otherwise."""
    message = await rt.storage.get_message(message_id)
    if message is not None and message["sender_id"] not in await rt.blocks.blocked(user_id):
        membership = await rt.members.membership(message["conversation_id"])
        if membership is not None and user_id in membership.ids:
            return message
        conversation = await rt.storage.get_conversation(message["conversation_id"])
        former = former_entry(conversation, user_id) if conversation else None
        if former is not None and message["seq"] <= former["up_to_seq"]:
            return message
    raise NotFound("no such message", code="message_not_found")


async def visible_to(rt: Runtime, viewer_id: str) -> Any:
    """`view(message)` as `viewer_id` gets it: a sender they blocked shows as a tombstone."""
    hidden = await rt.blocks.blocked(viewer_id)

    def view(message: Record) -> dict[str, Any]:
        if hidden and message["sender_id"] in hidden and not message.get("tombstone"):
            return blocked_view(message)
        return message_view(message)
    return view


async def history(rt: Runtime, user_id: str, conversation_id: str, before: int | None,
                  after: int | None, limit: int) -> dict[str, Any]:
    """A page of history; someone who left reads up to the seq that was last when they did."""
    if before is not None and after is not None:
        raise BadRequest("give before or after, not both", code="invalid_query")
    conversation = await member_conversation(rt, user_id, conversation_id, former=True)
    former = former_entry(conversation, user_id) if user_id not in conversation["participant_ids"] else None
    if former is not None:
        cap = former["up_to_seq"] + 1
        before = cap if before is None and after is None else before
        before = min(before, cap) if before is not None else None
    messages, more = await rt.storage.list_messages(conversation_id, before=before, after=after, limit=limit)
    last_seq = conversation["last_seq"] if former is None else former["up_to_seq"]
    if former is not None and after is not None:
        more = more and messages[-1]["seq"] < former["up_to_seq"]
        messages = [m for m in messages if m["seq"] <= former["up_to_seq"]]
    seqs = [m["seq"] for m in messages]
    # The span this page speaks for: to its far end while there is more, else to the edge.
    if after is not None:
        low, high = after + 1, seqs[-1] if more else last_seq
    else:
        low, high = seqs[0] if more else 1, (before - 1 if before is not None else last_seq)
    view = await visible_to(rt, user_id)
    return {"messages": [view(m) for m in messages], "has_more": more,
            "expired": expired_ranges(seqs, low, min(high, last_seq), conversation.get("pending_seqs", ()))}


def expired_ranges(seqs: list[int], low: int, high: int, pending: Iterable[int] = ()) -> list[list[int]]:
    """`[first, last]` seq ranges within `low..high` that hold no message: they expired
    (or passed retention). Seqs have no other gaps, so a client tells "expired" from
    "lost": only these are missing on purpose. `pending` seqs (a send under way, its
    message not numbered yet) are holes for a moment, and never reported."""
    present = sorted({*seqs, *(p for p in pending if low <= p <= high)})
    ranges, expect = [], low
    for seq in present:
        if seq > expect:
            ranges.append([expect, seq - 1])
        expect = seq + 1
    if expect <= high:
        ranges.append([expect, high])
    return ranges


# -- receipts -------------------------------------------------------------------
async def mark(rt: Runtime, user_id: str, message_id: str, kind: ReceiptKind,
               origin_conn: str | None = None) -> dict[str, Any]:
    """Move the caller's delivered/read cursor up to this message; tell the senders of
    the messages the move covers (those the contact boundary lets hear it) and the
    caller's other devices (all connections but `origin_conn`, whose reply carries it)."""
    message, membership = await member_message(rt, user_id, message_id)
    conversation_id = message["conversation_id"]
    receipt, before = await rt.storage.advance_receipt(conversation_id, user_id, kind, message["seq"])
    event = {"conversation_id": conversation_id, **receipt}
    if (receipt["delivered_seq"], receipt["read_seq"]) != (before["delivered_seq"], before["read_seq"]):
        told = [user_id]
        audience = await contacts.audience(rt, membership, user_id)
        if audience:
            covered_from = before["read_seq" if kind == "read" else "delivered_seq"]
            senders = ({message["sender_id"]} if covered_from == message["seq"] - 1  # the live case: one message
                       else await rt.storage.senders_between(conversation_id, covered_from, message["seq"]))
            told += [m for m in audience if m in senders]
        rt.bus.send(told, "message.receipt", event, exclude_conn=origin_conn)
    return event


async def message_receipts(rt: Runtime, user_id: str, message_id: str) -> dict[str, Any]:
    """Per member who has accepted the conversation (but the sender and anyone blocked
    either way): has this message been delivered, read?"""
    message, membership = await member_message(rt, user_id, message_id)
    if not membership.accepted(user_id):  # a request sees no receipts (kisse/contacts.py)
        raise NotFound("no such message", code="message_not_found")
    cursors = await rt.storage.get_receipts(message["conversation_id"])
    cut = await rt.blocks.either_way(user_id)
    members = []
    for member_id in membership.ids:
        if member_id == message["sender_id"] or member_id in membership.requests or member_id in cut:
            continue
        cursor = cursors.get(member_id, {"delivered_seq": 0, "read_seq": 0})
        members.append({"user_id": member_id, "delivered": cursor["delivered_seq"] >= message["seq"],
                        "read": cursor["read_seq"] >= message["seq"]})
    return {"message_id": message_id, "seq": message["seq"], "recipients": members}
