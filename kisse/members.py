"""Who belongs to a conversation, kept in process.

A conversation's participants never change once it exists (there is no API
to add or remove members), so the cache needs no invalidation, and stays
right with several Kisse processes on one database. If membership ever
becomes mutable, this is the place to invalidate it.
"""
from __future__ import annotations

from storage.base import Storage

CACHE_SIZE = 100_000  # conversations; a tuple of ids each


class Members:
    """Participant ids by conversation id, read from storage on a miss."""

    def __init__(self, storage: Storage, size: int = CACHE_SIZE) -> None:
        self._storage = storage
        self._size = size
        self._by_conversation: dict[str, tuple[str, ...]] = {}

    async def of(self, conversation_id: str) -> tuple[str, ...] | None:
        """The participant ids, or None if there is no such conversation."""
        members = self._by_conversation.get(conversation_id)
        if members is None:
            conversation = await self._storage.get_conversation(conversation_id)
            if conversation is None:
                return None
            members = tuple(conversation["participant_ids"])
            if len(self._by_conversation) >= self._size:
                del self._by_conversation[next(iter(self._by_conversation))]  # the oldest entry
            self._by_conversation[conversation_id] = members
        return members
