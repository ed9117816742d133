"""Prometheus metrics (prometheus_client), one registry per app so several apps
(tests, restarts) never collide."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self, open_connections: Callable[[], float], requests_in_progress: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        connections = Gauge("kisse_ws_connections", "Open WebSocket connections", registry=r)
        connections.set_function(open_connections)
        in_progress = Gauge("kisse_http_requests_in_progress", "REST requests Tornado is not done with yet",
                            registry=r)
        in_progress.set_function(requests_in_progress)
        self.http_latency = Histogram("kisse_http_request_duration_seconds", "HTTP request latency",
                                      ["route", "method", "status"], registry=r)
        self.messages = Counter("kisse_messages_total", "Messages stored and relayed", registry=r)
        self.frames = FrameCounts()
        r.register(self.frames)
        self.blob_bytes = Counter("kisse_blob_bytes_total", "Encrypted content bytes", ["direction"], registry=r)
        self.call_outcomes = Counter("kisse_call_outcomes_total", "Calls reaching a final status",
                                     ["status"], registry=r)
        self.rate_limited = Counter("kisse_rate_limited_total", "Requests refused by an abuse limit (429 or "
                                    "rate_limited)", ["limit"], registry=r)
        # The listener (kisse/listener.py) of `python -m kisse`; none in tests that build the app alone.
        self.listener_stats: Callable[[], dict[str, Any]] = dict
        for key, name, text in (
                ("refused", "kisse_connections_refused",
                 "Connections refused near the file-descriptor limit (cumulative)"),
                ("cut", "kisse_slow_clients_cut",
                 "Connections cut by the first request's header timeout or a body timeout (cumulative)")):
            Gauge(name, text, registry=r).set_function(lambda key=key: float(self.listener_stats().get(key, 0)))
        self.pushes = Counter("kisse_pushes_total", "Push wake-ups sent, by provider, kind and outcome",
                              ["provider", "kind", "outcome"], registry=r)
        self.push_latency = Histogram("kisse_push_request_duration_seconds", "Push provider request latency",
                                      ["provider"], registry=r)
        self.push_stats: Callable[[], dict[str, Any]] = dict
        for key, name, text in (("depth", "kisse_push_queue", "Pushes waiting to be sent"),
                                ("dropped_wakes", "kisse_push_dropped_wakeups",
                                 "Wake-ups dropped: the queue was full (cumulative)"),
                                ("dropped_registrations", "kisse_push_dropped_registrations",
                                 "Registrations the provider declared dead, dropped (cumulative)")):
            Gauge(name, text, registry=r).set_function(lambda key=key: float(self.push_stats().get(key, 0)))
        self.bus_stats: Callable[[], dict[str, Any]] = dict
        for key, text in (("published", "Events sent to other cluster nodes"),
                          ("received", "Events received from other cluster nodes"),
                          ("undelivered", "Events for other nodes dropped (Redis away, queue full)"),
                          ("operations", "Redis round trips made for events")):
            gauge = Gauge(f"kisse_bus_{key}_events" if key != "operations" else "kisse_bus_operations",
                          f"{text} (cumulative; 0 without KISSE_BUS)", registry=r)
            gauge.set_function(lambda key=key: float(self.bus_stats().get(key, 0)))


class FrameCounts(Collector):
    """`kisse_ws_frames_total{direction, type}`, counted in a plain dict and read at
    scrape time: a labelled Counter costs a lock and a lookup per frame, and a
    relayed message is four frames."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def count(self, direction: str, kind: str) -> None:
        key = (direction, kind)
        self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("kisse_ws_frames", "WebSocket frames by direction and type",
                                     labels=["direction", "type"])
        for (direction, kind), count in list(self._counts.items()):
            family.add_metric([direction, kind], count)
        yield family
