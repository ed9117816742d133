"""Prometheus metrics (prometheus_client), one registry per app so several apps
(tests, restarts) never collide."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, open_connections: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        connections = Gauge("kisse_ws_connections", "Open WebSocket connections", registry=r)
        connections.set_function(open_connections)
        self.http_latency = Histogram("kisse_http_request_duration_seconds", "HTTP request latency",
                                      ["route", "method", "status"], registry=r)
        self.messages = Counter("kisse_messages_total", "Messages stored and relayed", registry=r)
        self.ws_frames = Counter("kisse_ws_frames_total", "WebSocket frames by direction and type",
                                 ["direction", "type"], registry=r)
        self._frame_counters: dict[tuple[str, str], Any] = {}
        self.blob_bytes = Counter("kisse_blob_bytes_total", "Encrypted content bytes", ["direction"], registry=r)
        self.call_outcomes = Counter("kisse_call_outcomes_total", "Calls reaching a final status",
                                     ["status"], registry=r)

    def count_frame(self, direction: str, kind: str) -> None:
        """One WebSocket frame. The labelled child is looked up once per (direction, kind):
        `labels()` costs more than the increment, several times per relayed message."""
        counter = self._frame_counters.get((direction, kind))
        if counter is None:
            counter = self._frame_counters[(direction, kind)] = self.ws_frames.labels(direction, kind)
        counter.inc()
