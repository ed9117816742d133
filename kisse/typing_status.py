"""Typing indicators: relayed to the conversation's other members (those the contact
boundary lets hear it, kisse/contacts.py), expired by the server."""
from __future__ import annotations

import asyncio

from kisse import contacts, messaging
from kisse.hub import Connection
from kisse.runtime import Runtime


class TypingTracker:
    """Who is typing where, on which connection, until when."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # (conversation_id, user_id) -> (conn_id, members, expiry timer)
        self._active: dict[tuple[str, str], tuple[str, list[str], asyncio.TimerHandle]] = {}
        rt.hub.on_connection_closed.append(self._connection_closed)

    async def start(self, user_id: str, conn_id: str, conversation_id: str) -> dict[str, str]:
        membership = await messaging.membership_of(self.rt, user_id, conversation_id)
        key = (conversation_id, user_id)
        previous = self._active.pop(key, None)
        if previous:
            previous[2].cancel()
        others = await contacts.audience(self.rt, membership, user_id)
        timer = asyncio.get_running_loop().call_later(
            self.rt.settings.typing_timeout, self._expire, key)
        self._active[key] = (conn_id, others, timer)
        event = {"conversation_id": conversation_id, "user_id": user_id}
        if previous is None:  # a refresh extends the timer without a new event
            self.rt.bus.send(others, "typing.start", event)
        return event

    async def stop(self, user_id: str, conversation_id: str) -> dict[str, str]:
        await messaging.membership_of(self.rt, user_id, conversation_id)
        self._end((conversation_id, user_id), "stopped")
        return {"conversation_id": conversation_id, "user_id": user_id}

    def _expire(self, key: tuple[str, str]) -> None:
        self._end(key, "timeout")

    def _end(self, key: tuple[str, str], reason: str) -> None:
        entry = self._active.pop(key, None)
        if entry is None:
            return
        _, others, timer = entry
        timer.cancel()
        self.rt.bus.send(others, "typing.stop",
                            {"conversation_id": key[0], "user_id": key[1], "reason": reason})

    def _connection_closed(self, connection: Connection) -> None:
        for key, (conn_id, _, _) in list(self._active.items()):
            if conn_id == connection.conn_id:
                self._end(key, "disconnected")

    def close(self) -> None:
        for _, _, timer in self._active.values():
            timer.cancel()
        self._active.clear()
