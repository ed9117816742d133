"""The hub is this process's registry of live WebSocket connections, and writes
frames to them.

It knows users and their connections (several devices each) and nothing
about what events mean: services publish events on the bus (kisse/bus.py),
which hands those for this process's connections to the hub. An event is
encoded once and the same text is written to every connection.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from kisse.protocol import encode


class Connection(Protocol):
    conn_id: str
    user_id: str
    session_id: str
    client_ip: str

    def push(self, event_type: str, data: dict[str, Any], frame: bytes) -> None:
        """Queue an already-encoded event frame for this client."""

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...

    async def drain(self) -> None:
        """Take no new request; return once those taken are answered."""


class Hub:
    """Live connections by user, and fan-out to them."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, Connection]] = {}
        self._by_ip: dict[str, int] = {}  # open connections per client address (KISSE_MAX_WS_PER_IP)
        # Called with a user id when their first connection opens / last one closes.
        self.on_first_connection: list[Callable[[str], Any]] = []
        self.on_connection_added: list[Callable[[Connection], Any]] = []
        self.on_last_disconnection: list[Callable[[str], Any]] = []
        self.on_connection_closed: list[Callable[[Connection], Any]] = []
        # Connections with frames waiting for the end of this loop pass (handlers/outbox.py):
        # how busy writing is right now.
        self.flushes_waiting = 0

    def add(self, connection: Connection) -> None:
        devices = self._by_user.setdefault(connection.user_id, {})
        devices[connection.conn_id] = connection
        self._by_ip[connection.client_ip] = self._by_ip.get(connection.client_ip, 0) + 1
        for listener in self.on_connection_added:
            listener(connection)
        if len(devices) == 1:
            for listener in self.on_first_connection:
                listener(connection.user_id)

    def remove(self, connection: Connection) -> None:
        devices = self._by_user.get(connection.user_id)
        if not devices or devices.pop(connection.conn_id, None) is None:
            return
        left = self._by_ip.pop(connection.client_ip, 1) - 1
        if left:
            self._by_ip[connection.client_ip] = left
        for listener in self.on_connection_closed:
            listener(connection)
        if not devices:
            del self._by_user[connection.user_id]
            for listener in self.on_last_disconnection:
                listener(connection.user_id)

    def count_from(self, client_ip: str) -> int:
        """Open connections from this client address."""
        return self._by_ip.get(client_ip, 0)

    def sessions(self, user_ids: Iterable[str]) -> set[str]:
        """The device sessions of these users with a connection here."""
        return {c.session_id for u in user_ids for c in self._by_user.get(u, {}).values()}

    def is_connected(self, user_id: str) -> bool:
        return user_id in self._by_user

    def connections(self, user_id: str) -> list[Connection]:
        return list(self._by_user.get(user_id, {}).values())

    def get(self, user_id: str, conn_id: str) -> Connection | None:
        return self._by_user.get(user_id, {}).get(conn_id)

    def count(self) -> int:
        return sum(len(devices) for devices in self._by_user.values())

    def publish(self, user_ids: Iterable[str], event_type: str, data: dict[str, Any],
                exclude_conn: str | None = None) -> int:
        """Send an event to every connection of `user_ids` (but `exclude_conn`)."""
        frame = encode(event_type, data)
        sent = 0
        for user_id in dict.fromkeys(user_ids):
            for connection in list(self._by_user.get(user_id, {}).values()):
                if connection.conn_id != exclude_conn:
                    connection.push(event_type, data, frame)
                    sent += 1
        return sent

    def publish_session(self, user_id: str, session_id: str, event_type: str, data: dict[str, Any]) -> int:
        """Send an event to the user's connections of one device session."""
        mine = [c for c in self._by_user.get(user_id, {}).values() if c.session_id == session_id]
        if mine:
            frame = encode(event_type, data)
            for connection in mine:
                connection.push(event_type, data, frame)
        return len(mine)

    def push_one(self, connection: Connection, event_type: str, data: dict[str, Any]) -> None:
        connection.push(event_type, data, encode(event_type, data))

    def close_sessions(self, user_id: str, session_ids: set[str], code: int, reason: str) -> None:
        """Close the user's connections that belong to these sessions."""
        for connection in self.connections(user_id):
            if connection.session_id in session_ids:
                connection.close(code, reason)

    def all(self) -> list[Connection]:
        return [connection for devices in self._by_user.values() for connection in devices.values()]

    def close_all(self, code: int, reason: str) -> None:
        for devices in list(self._by_user.values()):
            for connection in list(devices.values()):
                connection.close(code, reason)
