"""Who belongs to a conversation, and how, kept in process.

Membership changes (accept, leave, add, remove, roles): every change goes
through `kisse/membership.py`, which publishes `conversation.changed` on the
bus once storage has it, so every process of a cluster forgets its copy
(`on_event`) and reads the new one when it next needs it.
"""
from __future__ import annotations

from dataclasses import dataclass

from kisse.bus import CONVERSATION_CHANGED, Event
from storage.base import Record, Storage

CACHE_SIZE = 100_000  # conversations


@dataclass(frozen=True, slots=True)
class Membership:
    """A conversation's members: `ids` in joining order, `requests` who have not accepted."""

    kind: str
    ids: tuple[str, ...]
    requests: frozenset[str]
    admins: frozenset[str]
    message_ttl: int | None = None  # disappearing messages: what a send gives its message

    @classmethod
    def of(cls, conversation: Record) -> "Membership":
        return cls(conversation["kind"], tuple(conversation["participant_ids"]),
                   frozenset(conversation["requests"]), frozenset(conversation["admins"]),
                   conversation.get("message_ttl"))

    def accepted(self, user_id: str) -> bool:
        return user_id in self.ids and user_id not in self.requests


class Members:
    """Memberships by conversation id, read from storage on a miss.

    A change anywhere makes every process `forget` (a bus event). A read that
    was already under way when something was forgotten may hold the old
    membership, so it is used but not kept: `_version` counts forgets."""

    def __init__(self, storage: Storage, size: int = CACHE_SIZE) -> None:
        self._storage = storage
        self._size = size
        self._by_conversation: dict[str, Membership] = {}
        self._version = 0

    async def membership(self, conversation_id: str) -> Membership | None:
        """The membership, or None if there is no such conversation."""
        membership = self._by_conversation.get(conversation_id)
        if membership is None:
            version = self._version
            conversation = await self._storage.get_conversation(conversation_id)
            if conversation is None:
                return None
            membership = Membership.of(conversation)
            if version == self._version:
                self._keep(conversation_id, membership)
        return membership

    def peek(self, conversation_id: str) -> Membership | None:
        """The cached membership, if any (no storage read)."""
        return self._by_conversation.get(conversation_id)

    def remember(self, conversation: Record) -> Membership:
        """Cache the membership of a conversation just created (nobody can have changed it)."""
        membership = Membership.of(conversation)
        self._keep(conversation["id"], membership)
        return membership

    def _keep(self, conversation_id: str, membership: Membership) -> None:
        if conversation_id not in self._by_conversation and len(self._by_conversation) >= self._size:
            del self._by_conversation[next(iter(self._by_conversation))]  # the oldest entry
        self._by_conversation[conversation_id] = membership

    def forget(self, conversation_id: str) -> None:
        self._version += 1
        self._by_conversation.pop(conversation_id, None)

    def on_event(self, event: Event) -> None:
        """A bus subscriber: some process changed a conversation's membership."""
        if event.type == CONVERSATION_CHANGED:
            self.forget(event.data["conversation_id"])
