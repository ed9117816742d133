"""Liveness and readiness probes, and what the server offers."""
from __future__ import annotations

import asyncio

from handlers.base import APIHandler
from kisse.capabilities import capabilities
from kisse.errors import Unavailable

READY_TIMEOUT = 2.0


class HealthHandler(APIHandler):
    """Alive: the process answers HTTP."""

    auth_required = False

    def get(self) -> None:
        self.send_json({"status": "ok"})


class ReadyHandler(APIHandler):
    """Ready: storage answers within a couple of seconds."""

    auth_required = False

    async def get(self) -> None:
        try:
            await asyncio.wait_for(self.storage.ping(), READY_TIMEOUT)
        except Exception:
            raise Unavailable("storage is not answering", code="not_ready") from None
        # A degraded bus (Redis away) still serves: messages are stored, clients on
        # other nodes catch up with sync. It is reported, not a reason to stop traffic.
        self.send_json({"status": "ready", "bus": self.rt.bus.health()})


class CapabilitiesHandler(APIHandler):
    """Limits, timers and features of this server (no token: clients read it before login)."""

    auth_required = False

    def get(self) -> None:
        self.send_json(capabilities(self.kisse_settings, list(self.rt.push.providers)))


routes = [(r"/healthz", HealthHandler), (r"/readyz", ReadyHandler), (r"/api/capabilities", CapabilitiesHandler)]
