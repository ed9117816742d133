"""The seam between catch-up and live delivery on one WebSocket.

A (re)connecting client sends `sync` with, per conversation, the highest seq
it holds. The catch-up then sends every later message from storage, paced by
the client's reading, and only then the live `message.new` frames that arrived
meanwhile, minus those the catch-up already covered: the client sees each
conversation in seq order, with no gap and no duplicate.

Live messages are held from the moment the connection opens until its first
`sync` ends (or, for a client that never syncs, until `KISSE_WS_SYNC_GRACE`
passes), and during any later `sync`. What is held is bounded by
`KISSE_WS_QUEUE_BYTES`; past it the held frames are dropped and the catch-up
makes one more pass over storage, where they are, from where it got to.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from kisse import messaging
from storage.base import Record, Storage

PAGE = 200
# Recent live pushes a connection remembers, so that a later `sync` does not send them again.
PUSHED_MEMORY = 5000
CONVERSATIONS_MAX = 100_000

Key = tuple[str, int]  # (conversation id, seq)


class CatchUp:
    """One connection's held live messages and what its catch-ups have sent."""

    __slots__ = ("holding", "_held", "_held_bytes", "_held_limit", "_overflowed", "_pushed")  # one per socket

    def __init__(self, held_limit: int) -> None:
        self.holding = True
        self._held: list[tuple[Key, bytes]] = []
        self._held_bytes = 0
        self._held_limit = held_limit
        self._overflowed = False
        self._pushed: dict[Key, None] = {}

    def offer(self, message: dict[str, Any], frame: bytes) -> bool:
        """A live `message.new`: True if it must wait for the catch-up (it is held)."""
        key = (message["conversation_id"], message["seq"])
        if not self.holding:
            self._remember(key)
            return False
        if self._held_bytes + len(frame) > self._held_limit:
            # Storage has them: the catch-up's next pass sends them instead.
            self._held.clear()
            self._held_bytes = 0
            self._overflowed = True
        else:
            self._held.append((key, frame))
            self._held_bytes += len(frame)
        return True

    def release(self, covered: set[Key] = frozenset()) -> list[bytes]:  # type: ignore[assignment]
        """Stop holding; the held frames the catch-up did not cover, in arrival order."""
        held, self._held, self._held_bytes = self._held, [], 0
        self.holding = False
        released = [(key, frame) for key, frame in held if key not in covered]
        for key, _ in released:
            self._remember(key)
        return [frame for _, frame in released]

    def _remember(self, key: Key) -> None:
        self._pushed[key] = None
        if len(self._pushed) > PUSHED_MEMORY:
            del self._pushed[next(iter(self._pushed))]

    async def run(self, storage: Storage, user_id: str, cursors: dict[str, int],
                  send: Callable[[dict[str, Any]], Awaitable[bool]],
                  view: Callable[[Record], dict[str, Any]] = messaging.message_view,
                  ) -> tuple[int, list[bytes], dict[str, list[list[int]]]]:
        """Send every message after `cursors` through `send` (which waits for the
        socket and says False once it is gone); return how many messages the
        catch-up covered, the held frames to send after it, and per conversation
        the seq ranges it passed that hold no message (expired)."""
        self.holding = True
        covered: set[Key] = set()
        holes: dict[str, set[tuple[int, int]]] = {}
        upto = dict(cursors)  # per conversation: the highest seq sent (or the client's cursor)
        while True:
            self._overflowed = False
            for conversation in await storage.list_conversations(user_id, limit=CONVERSATIONS_MAX):
                conversation_id = conversation["id"]
                after = upto.get(conversation_id)
                if after is None:
                    receipt = (await storage.get_receipts(conversation_id)).get(user_id)
                    after = receipt["delivered_seq"] if receipt else 0
                last_seq = conversation["last_seq"]
                while after < last_seq:
                    page, more = await storage.list_messages(conversation_id, after=after, limit=PAGE)
                    for hole in messaging.expired_ranges([r["seq"] for r in page], after + 1,
                                                         page[-1]["seq"] if more else last_seq,
                                                         conversation.get("pending_seqs", ())):
                        holes.setdefault(conversation_id, set()).add((hole[0], hole[1]))
                    for record in page:
                        key = (conversation_id, record["seq"])
                        if key not in self._pushed and key not in covered:
                            if not await send(view(record)):
                                return len(covered), self.release(covered), _ranges(holes)
                        covered.add(key)
                        upto[conversation_id] = after = record["seq"]
                    if not page or not more:
                        break
            if not self._overflowed:  # nothing held was dropped: the seam is complete
                return len(covered), self.release(covered), _ranges(holes)


def _ranges(holes: dict[str, set[tuple[int, int]]]) -> dict[str, list[list[int]]]:
    return {conversation_id: [list(r) for r in sorted(found)] for conversation_id, found in holes.items()}
