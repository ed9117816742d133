"""All routes, joined from each handler module."""
from __future__ import annotations

from typing import Any

from handlers import (auth, blocks, calls, content, conversations, devices, health, keys, messages, metrics, presence,
                      push, users, ws)

default_handlers: list[tuple[str, Any]] = [
    *health.routes,
    *metrics.routes,
    *auth.routes,
    *devices.routes,
    *keys.routes,
    *push.routes,
    *users.routes,
    *blocks.routes,
    *conversations.routes,
    *messages.routes,
    *content.routes,
    *presence.routes,
    *calls.routes,
    *ws.routes,
]
