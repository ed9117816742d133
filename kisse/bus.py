"""The event bus: services publish domain events, addressed to users or to one
connection; the bus brings each to the processes holding those connections,
and there the hub (the local registry) writes the frames.

An `Event` says what happened and to whom, not how it is encoded: the
WebSocket frame is `{type, data}`, written by whichever process holds the
connection; other subscribers (metrics, push wake-ups later) see the same
events. Internal events (`INTERNAL`) change this process's state instead of
reaching a client: a device revoked, a cache entry to drop.

`Bus` itself (the default) is one process: publishing is delivering, at once.
`kisse/redis_bus.py` joins several processes through Redis.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kisse.hub import Hub

log = logging.getLogger("kisse.bus")

# Events that are no frame: what the hub and the caches do with them.
SESSIONS_REVOKED = "sessions.revoked"        # data {session_ids, code, reason}: close those connections
CONVERSATION_CHANGED = "conversation.changed"  # data {conversation_id}: forget its cached membership
BLOCKS_CHANGED = "blocks.changed"            # data {user_ids}: forget their cached blocks
PUSH_CHANGED = "push.changed"                # data {user_ids}: forget their cached push registrations
INTERNAL = frozenset({SESSIONS_REVOKED, CONVERSATION_CHANGED, BLOCKS_CHANGED, PUSH_CHANGED})


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a setattr call per field, per event
class Event:
    """`type` and `data` (the frame), for every connection of `users` but
    `exclude_conn`; or, with `conn`, for that one connection of `users[0]`;
    or, with `session`, for the connections of that device of `users[0]`;
    or, with `everywhere`, for every process (internal events only)."""

    type: str
    data: dict[str, Any]
    users: tuple[str, ...] = ()
    conn: str | None = None
    exclude_conn: str | None = None
    everywhere: bool = False
    session: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "data": self.data, "users": list(self.users), "conn": self.conn,
                "exclude_conn": self.exclude_conn, "everywhere": self.everywhere, "session": self.session}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Event":
        return cls(raw["type"], raw["data"], tuple(raw["users"]), raw["conn"], raw["exclude_conn"],
                   raw["everywhere"], raw.get("session"))  # .get: a node of the version before sessions


Subscriber = Callable[[Event], Any]


class Bus:
    """One process: every event is delivered here, at once (today's speed)."""

    name = "local"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        # Subscribers by event type ("*": every event); a chat message's events reach only
        # those who asked for them, so the hot path pays nothing for cache subscribers.
        self._subscribers: dict[str, list[Subscriber]] = {}
        # Called with a user id when a dead node's user is present nowhere any more.
        self.on_user_gone: list[Callable[[str], Any]] = []
        # Called with each event this process publishes (not those it receives from other
        # nodes): whatever must happen once per cluster, such as a push wake-up.
        self.on_publish: list[Subscriber] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]:
        return {"bus": self.name, "state": "ok"}

    def subscribe(self, subscriber: Subscriber, *event_types: str) -> None:
        """Call `subscriber(event)` for every event of these types delivered here (none: all)."""
        for event_type in event_types or ("*",):
            self._subscribers.setdefault(event_type, []).append(subscriber)

    def send(self, users: Iterable[str], event_type: str, data: dict[str, Any],
             exclude_conn: str | None = None) -> int:
        """Publish a frame to every connection of `users` (but `exclude_conn`); how many
        connections of this process it was handed to."""
        return self.publish(Event(event_type, data, tuple(users), exclude_conn=exclude_conn))

    def send_device(self, user_id: str, session_id: str, event_type: str, data: dict[str, Any]) -> int:
        """Publish a frame to the connections of one device (its session), wherever they are."""
        return self.publish(Event(event_type, data, (user_id,), session=session_id))

    def revoke_sessions(self, user_id: str, session_ids: Iterable[str], code: int, reason: str) -> None:
        """Close the user's connections of these sessions, on whichever process holds them."""
        self.publish(Event(SESSIONS_REVOKED, {"session_ids": sorted(session_ids), "code": code, "reason": reason},
                           (user_id,)))

    def changed(self, event_type: str, data: dict[str, Any]) -> None:
        """Tell every process that cached state changed (CONVERSATION_CHANGED, BLOCKS_CHANGED,
        PUSH_CHANGED)."""
        self.publish(Event(event_type, data, everywhere=True))

    def publish(self, event: Event) -> int:
        self.published(event)
        return self.deliver(event)

    def published(self, event: Event) -> None:
        """Run the `on_publish` hooks; a hook's bug must not stop the event."""
        for hook in self.on_publish:
            try:
                hook(event)
            except Exception:
                log.exception("publish hook failed on %s", event.type)

    def deliver(self, event: Event) -> int:
        """Hand an event to this process: the subscribers, then the hub's connections."""
        subscribers = self._subscribers
        if subscribers:
            for subscriber in (*subscribers.get(event.type, ()), *subscribers.get("*", ())):
                try:
                    subscriber(event)
                except Exception:  # one subscriber's bug must not stop the others, nor the frames
                    log.exception("event subscriber failed on %s", event.type)
        if event.type in INTERNAL:
            if event.type == SESSIONS_REVOKED:
                self.hub.close_sessions(event.users[0], set(event.data["session_ids"]), event.data["code"],
                                        event.data["reason"])
            return 0
        if event.conn is not None:
            connection = self.hub.get(event.users[0], event.conn)
            if connection is None:
                return 0
            self.hub.push_one(connection, event.type, event.data)
            return 1
        if event.session is not None:
            return self.hub.publish_session(event.users[0], event.session, event.type, event.data)
        return self.hub.publish(event.users, event.type, event.data, exclude_conn=event.exclude_conn)

    # -- the directory of who is where (a cluster's; one process knows it all) ---------
    async def joined(self, user_id: str) -> None:
        """The user is present on this process (their first connection opened)."""

    async def left(self, user_id: str) -> None:
        """The user is not present on this process any more (their grace is over)."""

    async def present(self, user_ids: Iterable[str]) -> set[str]:
        """Which of these users are present on some process (connected, or within
        their presence grace); here, those connected to this one."""
        return {u for u in user_ids if self.hub.is_connected(u)}

    async def present_elsewhere(self, user_id: str) -> bool:
        """Whether another process has the user present."""
        return False

    async def connected_sessions(self, user_ids: Iterable[str]) -> set[str]:
        """The device sessions of these users with a live connection on some process."""
        return self.hub.sessions(user_ids)

    def connection_opened(self, connection: Any) -> None:
        """A hub hook: a connection of this process opened (a cluster tells the others)."""

    def connection_closed(self, connection: Any) -> None:
        """A hub hook: a connection of this process closed."""


def make_bus(settings: Any, hub: Hub) -> Bus:
    """The bus `KISSE_BUS` names: empty for this process alone, `redis://…` for a cluster."""
    if settings.bus:
        from kisse.redis_bus import RedisBus
        return RedisBus(hub, settings)
    return Bus(hub)
