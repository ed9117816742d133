"""Users, conversations, messages and receipts: one function per action,
shared by the REST handlers and the WebSocket."""
from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import datetime, timedelta
from typing import Any

from kisse import presence
from kisse.errors import BadRequest, Conflict, NotFound
from kisse.runtime import Runtime
from kisse.views import iso, message_view, page_cursor, presence_view, user_view
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
async def member_conversation(rt: Runtime, user_id: str, conversation_id: str) -> Record:
    """The conversation if `user_id` belongs to it; 404 alike for absent and foreign ones."""
    conversation = await rt.storage.get_conversation(conversation_id)
    if conversation is None or user_id not in conversation["participant_ids"]:
        raise NotFound("no such conversation", code="conversation_not_found")
    return conversation


async def conversation_members(rt: Runtime, user_id: str, conversation_id: str) -> tuple[str, ...]:
    """The participant ids if `user_id` is one of them; 404 alike for absent and foreign ones."""
    members = await rt.members.of(conversation_id)
    if members is None or user_id not in members:
        raise NotFound("no such conversation", code="conversation_not_found")
    return members


async def create_conversation(rt: Runtime, user_id: str, participant_ids: list[str],
                              title: str | None) -> tuple[dict[str, Any], bool]:
    """A direct conversation (two people, unique per pair) or a group."""
    members = list(dict.fromkeys([user_id, *participant_ids]))
    if len(members) < 2:
        raise BadRequest("a conversation needs at least one other participant", code="too_few_participants")
    if len(members) > rt.settings.max_group_members:
        raise BadRequest(f"a conversation has at most {rt.settings.max_group_members} members",
                         code="too_many_participants")
    found = {u["id"] for u in await rt.storage.get_users(members)}
    unknown = [m for m in members if m not in found]
    if unknown:
        raise BadRequest(f"unknown participant ids: {', '.join(unknown)}", code="unknown_participants",
                         details={"participant_ids": unknown})
    if len(members) == 2:
        conversation, created = await rt.storage.get_or_create_direct(members[0], members[1])
    else:
        conversation, created = await rt.storage.create_group(user_id, members, title), True
    if created:
        view = await conversation_view(rt, conversation, user_id)
        rt.hub.publish(members, "conversation.new", view)
        return view, True
    return await conversation_view(rt, conversation, user_id), False


async def conversation_view(rt: Runtime, conversation: Record, viewer_id: str) -> dict[str, Any]:
    """A conversation as `viewer_id` sees it: participants with presence, last message, unread."""
    return (await conversation_views(rt, [conversation], viewer_id))[0]


async def conversation_views(rt: Runtime, conversations: list[Record], viewer_id: str) -> list[dict[str, Any]]:
    """`conversation_view` of each, with one read of users and one of presence for them all."""
    member_ids = list(dict.fromkeys(m for c in conversations for m in c["participant_ids"]))
    users = {u["id"]: u for u in await rt.storage.get_users(member_ids)}
    presences = await rt.storage.get_presences(member_ids)
    return [await _conversation_view(rt, c, viewer_id, users, presences) for c in conversations]


async def _conversation_view(rt: Runtime, conversation: Record, viewer_id: str, users: dict[str, Record],
                             presences: dict[str, Record]) -> dict[str, Any]:
    participants = [{**{k: v for k, v in user_view(user).items() if k != "created_at"},
                     "presence": presence_view(user["id"], "offline", None) if user["deleted"]
                     else presence.shown(rt, user["id"], presences.get(user["id"]))}
                    for user in (users.get(m) for m in conversation["participant_ids"]) if user is not None]
    receipt = (await rt.storage.get_receipts(conversation["id"])).get(viewer_id)
    read_seq = receipt["read_seq"] if receipt else 0
    unread = (await rt.storage.count_unread(conversation["id"], viewer_id, read_seq)
              if conversation["last_seq"] > read_seq else 0)
    last = conversation["last_message"]
    return {"id": conversation["id"], "kind": conversation["kind"], "title": conversation["title"],
            "created_by": conversation["created_by"], "created_at": iso(conversation["created_at"]),
            "last_activity_at": iso(conversation["last_activity_at"]),
            "last_seq": conversation["last_seq"], "participants": participants,
            "last_message": message_view(last) if last else None, "unread_count": unread}


async def list_conversations(rt: Runtime, user_id: str, limit: int,
                             before: tuple[datetime, str] | None) -> dict[str, Any]:
    conversations = await rt.storage.list_conversations(user_id, limit + 1, before)
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
    data = decode_ciphertext(rt, ciphertext)
    members = await conversation_members(rt, user_id, conversation_id)
    content = ({"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "inline": True}
               if data is not None else None)
    key = (user_id, client_message_id)
    rt.sending.add(key)
    try:
        message, created = await rt.storage.add_message(conversation_id, user_id, client_message_id, data, content)
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
        rt.hub.publish(members, "message.new", view, exclude_conn=origin_conn)
    return view, created


async def repair_sends(rt: Runtime) -> int:
    """Finish sends abandoned part-way (their process died, nobody retried) and publish them."""
    older_than = utcnow() - timedelta(seconds=rt.settings.send_repair_after)
    repaired = await rt.storage.repair_sends(older_than, set(rt.sending))
    for message in repaired:
        members = await rt.members.of(message["conversation_id"])
        rt.metrics.messages.inc()
        rt.hub.publish(members or (), "message.new", message_view(message))
    return len(repaired)


async def member_message(rt: Runtime, user_id: str, message_id: str) -> tuple[Record, tuple[str, ...]]:
    """`(message, its conversation's members)` if the user is a member; 404 alike otherwise."""
    message = await rt.storage.get_message(message_id)
    if message is not None:
        members = await rt.members.of(message["conversation_id"])
        if members is not None and user_id in members:
            return message, members
    raise NotFound("no such message", code="message_not_found")


async def history(rt: Runtime, user_id: str, conversation_id: str, before: int | None,
                  after: int | None, limit: int) -> dict[str, Any]:
    if before is not None and after is not None:
        raise BadRequest("give before or after, not both", code="invalid_query")
    await conversation_members(rt, user_id, conversation_id)
    messages, more = await rt.storage.list_messages(conversation_id, before=before, after=after, limit=limit)
    return {"messages": [message_view(m) for m in messages], "has_more": more}


# -- receipts -------------------------------------------------------------------
async def mark(rt: Runtime, user_id: str, message_id: str, kind: ReceiptKind,
               origin_conn: str | None = None) -> dict[str, Any]:
    """Move the caller's delivered/read cursor up to this message; tell the members live
    (all their connections but `origin_conn`, whose reply carries the receipt)."""
    message, members = await member_message(rt, user_id, message_id)
    conversation_id = message["conversation_id"]
    receipt, moved = await rt.storage.advance_receipt(conversation_id, user_id, kind, message["seq"])
    event = {"conversation_id": conversation_id, **receipt}
    if moved:
        rt.hub.publish(members, "message.receipt", event, exclude_conn=origin_conn)
    return event


async def message_receipts(rt: Runtime, user_id: str, message_id: str) -> dict[str, Any]:
    """Per member (but the sender): has this message been delivered, read?"""
    message, member_ids = await member_message(rt, user_id, message_id)
    cursors = await rt.storage.get_receipts(message["conversation_id"])
    members = []
    for member_id in member_ids:
        if member_id == message["sender_id"]:
            continue
        cursor = cursors.get(member_id, {"delivered_seq": 0, "read_seq": 0})
        members.append({"user_id": member_id, "delivered": cursor["delivered_seq"] >= message["seq"],
                        "read": cursor["read_seq"] >= message["seq"]})
    return {"message_id": message_id, "seq": message["seq"], "recipients": members}
