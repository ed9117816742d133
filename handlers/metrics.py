"""`/metrics` in the Prometheus text format (restrict it at your reverse proxy)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from handlers.base import APIHandler


class MetricsHandler(APIHandler):
    auth_required = False

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.rt.metrics.registry))


routes = [(r"/metrics", MetricsHandler)]
