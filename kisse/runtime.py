"""The running server's shared parts, handed to every service function."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from config.settings import Settings
from kisse.bus import Bus
from kisse.heartbeat import Heartbeat
from kisse.hub import Hub
from kisse.tasks import Background
from storage.base import Storage

if TYPE_CHECKING:
    from kisse.calls import CallTimers
    from kisse.contacts import Blocks
    from kisse.forgetting import Forgetting
    from kisse.push import PushService
    from kisse.limits import Limits
    from kisse.members import Members
    from kisse.metrics import Metrics
    from kisse.presence import PresenceTracker
    from kisse.typing_status import TypingTracker


@dataclass
class Runtime:
    """Settings, storage, the live-connection hub, presence, typing, call timers
    and the conversation-members cache.

    `presence`, `typing`, `calls`, `metrics` and `members` are attached by `make_app` once the runtime exists,
    since both need it.
    """

    settings: Settings
    storage: Storage
    hub: Hub = field(default_factory=Hub)
    bus: Bus = field(init=False)
    tasks: Background = field(default_factory=Background)
    presence: "PresenceTracker" = field(init=False)
    calls: "CallTimers" = field(init=False)
    metrics: "Metrics" = field(init=False)
    typing: "TypingTracker" = field(init=False)
    members: "Members" = field(init=False)
    blocks: "Blocks" = field(init=False)
    limits: "Limits" = field(init=False)
    forgetting: "Forgetting" = field(init=False)
    push: "PushService" = field(init=False)
    heartbeat: Heartbeat = field(init=False)
    # REST requests being served now; shutdown waits for them.
    inflight: int = 0
    # Messages whose content is being uploaded to this process right now.
    uploading: set[str] = field(default_factory=set)
    # (sender, client_message_id) of sends in flight here, and of those whose storage
    # call failed (kisse/messaging.py).
    sending: set[tuple[str, str]] = field(default_factory=set)
    unconfirmed_sends: dict[tuple[str, str], None] = field(default_factory=dict)
    # bcrypt hash of a random password, verified for unknown users at login.
    dummy_hash: str | None = None
