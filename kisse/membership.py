"""Changes of membership: accepting or declining a request, leaving, and what a
group's admins do (add, remove, promote, retitle).

Each change is one atomic storage step; then every process forgets its cached
membership (`messaging.membership_changed`, a bus event) and everyone
concerned hears it live:
`member.added` / `member.removed` / `conversation.updated` to the members, a
`conversation.request` to whoever was added.
"""
from __future__ import annotations

from typing import Any

from kisse import messaging
from kisse.errors import BadRequest, Conflict, Forbidden, NotFound
from kisse.runtime import Runtime
from storage.base import Record


def _accepted(conversation: Record) -> list[str]:
    """Who hears a conversation's changes: members who accepted it. A request's
    recipient got one `conversation.request`, and nothing else until they accept."""
    return [m for m in conversation["participant_ids"] if m not in conversation["requests"]]


def _updated(conversation: Record) -> dict[str, Any]:
    return {"conversation_id": conversation["id"], "title": conversation["title"],
            "admins": list(conversation["admins"]), "message_ttl": conversation.get("message_ttl")}


async def accept(rt: Runtime, user_id: str, conversation_id: str) -> dict[str, Any]:
    """The user accepts the conversation (a no-op if they had); their devices hear it."""
    before = await messaging.membership_of(rt, user_id, conversation_id)
    conversation = await rt.storage.accept_conversation(conversation_id, user_id)
    if conversation is None:
        raise messaging.no_conversation()
    view = await messaging.conversation_view(rt, conversation, user_id)
    if user_id in before.requests:  # accepting again changes nothing and tells nobody
        messaging.membership_changed(rt, conversation)
        rt.bus.send([user_id], "conversation.updated", {**_updated(conversation), "membership": view["membership"]})
    return view


async def decline(rt: Runtime, user_id: str, conversation_id: str) -> None:
    """Decline a pending request: the user leaves; the others learn only that."""
    membership = await messaging.membership_of(rt, user_id, conversation_id)
    if user_id not in membership.requests:
        raise Conflict("this conversation is not a request for you", code="not_a_request")
    await leave(rt, user_id, conversation_id)


async def leave(rt: Runtime, user_id: str, conversation_id: str, by: str | None = None) -> None:
    """`user_id` is out of the conversation: left (by themself) or removed (`by` an admin)."""
    before = await messaging.membership_of(rt, user_id, conversation_id)
    conversation = await rt.storage.leave_conversation(conversation_id, user_id)
    if conversation is None:
        raise messaging.no_conversation()
    messaging.membership_changed(rt, conversation)
    event = {"conversation_id": conversation_id, "user_id": user_id, "by": by or user_id,
             "reason": "removed" if by and by != user_id else "left"}
    rt.bus.send([*_accepted(conversation), user_id], "member.removed", event)
    if set(conversation["admins"]) != before.admins:  # the last admin left: someone was promoted
        rt.bus.send(_accepted(conversation), "conversation.updated", _updated(conversation))


async def _admin_of_group(rt: Runtime, user_id: str, conversation_id: str) -> None:
    membership = await messaging.membership_of(rt, user_id, conversation_id)
    if membership.kind != "group":
        raise Conflict("a direct conversation has no admins", code="not_a_group")
    if user_id not in membership.admins:
        raise Forbidden("only the group's admins can do this", code="not_admin")


async def add_members(rt: Runtime, admin_id: str, conversation_id: str, user_ids: list[str]) -> dict[str, Any]:
    await _admin_of_group(rt, admin_id, conversation_id)
    await messaging.check_reachable(rt, admin_id, [u for u in dict.fromkeys(user_ids) if u != admin_id])
    try:
        changed = await rt.storage.add_members(conversation_id, user_ids, rt.settings.max_group_members)
    except ValueError:
        raise BadRequest(f"a conversation has at most {rt.settings.max_group_members} members",
                         code="too_many_participants") from None
    if changed is None:
        raise messaging.no_conversation()
    conversation, added = changed
    messaging.membership_changed(rt, conversation)
    if added:
        others = [m for m in _accepted(conversation) if m not in added]
        rt.bus.send(others, "member.added", {"conversation_id": conversation_id, "user_ids": added,
                                                "by": admin_id})
        await messaging.send_requests(rt, conversation, added)
    return {"conversation": await messaging.conversation_view(rt, conversation, admin_id), "added": added}


async def remove_member(rt: Runtime, admin_id: str, conversation_id: str, user_id: str) -> None:
    await _admin_of_group(rt, admin_id, conversation_id)
    if user_id == admin_id:
        raise BadRequest("to remove yourself, leave the conversation", code="use_leave")
    membership = await messaging.membership_of(rt, admin_id, conversation_id)
    if user_id not in membership.ids:
        raise NotFound("no such member", code="member_not_found")
    await leave(rt, user_id, conversation_id, by=admin_id)


async def set_role(rt: Runtime, admin_id: str, conversation_id: str, user_id: str, role: str) -> dict[str, Any]:
    await _admin_of_group(rt, admin_id, conversation_id)
    conversation = await rt.storage.set_admin(conversation_id, user_id, role == "admin")
    if conversation is None:
        raise NotFound("no such member", code="member_not_found")
    if not conversation["admins"]:  # the last admin stepped down: undo, a group keeps one
        conversation = await rt.storage.set_admin(conversation_id, user_id, True) or conversation
        messaging.membership_changed(rt, conversation)
        raise Conflict("a group needs an admin: promote someone else first", code="last_admin")
    messaging.membership_changed(rt, conversation)
    rt.bus.send(_accepted(conversation), "conversation.updated", _updated(conversation))
    return {"conversation": await messaging.conversation_view(rt, conversation, admin_id)}


def check_message_ttl(rt: Runtime, ttl: int | None) -> None:
    """400 for a timer shorter than KISSE_MIN_MESSAGE_TTL (the schema bounds the rest)."""
    if ttl is not None and ttl < rt.settings.min_message_ttl:
        raise BadRequest(f"message_ttl: must be at least {rt.settings.min_message_ttl} seconds, or null",
                         code="invalid_field", details={"field": "message_ttl"})


async def set_message_ttl(rt: Runtime, user_id: str, conversation_id: str, ttl: int | None) -> dict[str, Any]:
    """Disappearing messages, set (or turned off) by any member: messages sent from now
    on expire `ttl` seconds after they are sent. Every member hears it."""
    check_message_ttl(rt, ttl)
    await messaging.member_conversation(rt, user_id, conversation_id)
    conversation = await rt.storage.set_message_ttl(conversation_id, ttl)
    if conversation is None:
        raise messaging.no_conversation()
    messaging.membership_changed(rt, conversation)  # sends read the ttl from the cached membership
    rt.bus.send(_accepted(conversation), "conversation.updated", _updated(conversation))
    return {"conversation": await messaging.conversation_view(rt, conversation, user_id)}


async def set_title(rt: Runtime, admin_id: str, conversation_id: str, title: str | None) -> dict[str, Any]:
    await _admin_of_group(rt, admin_id, conversation_id)
    conversation = await rt.storage.set_title(conversation_id, title)
    if conversation is None:
        raise messaging.no_conversation()
    rt.bus.send(_accepted(conversation), "conversation.updated", _updated(conversation))
    return {"conversation": await messaging.conversation_view(rt, conversation, admin_id)}
