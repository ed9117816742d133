"""`make_app(settings, storage)`: the Tornado application, plus start-up and shutdown."""
from __future__ import annotations

import asyncio
import logging

import tornado.web

from config.settings import Settings
from handlers import default_handlers
from handlers.base import NotFoundHandler
from kisse import auth, messaging
from kisse.calls import CallTimers
from kisse.bus import BLOCKS_CHANGED, CONVERSATION_CHANGED, make_bus
from kisse.contacts import Blocks
from kisse.forgetting import Forgetting
from kisse.push import PushService
from kisse import limits
from kisse.heartbeat import Heartbeat
from kisse.limits import Limits
from kisse.members import Members
from kisse.metrics import Metrics
from kisse.presence import PresenceTracker
from kisse.protocol import CLOSE_GOING_AWAY
from kisse.runtime import Runtime
from kisse.tasks import Background
from kisse.typing_status import TypingTracker
from storage.base import Storage

access_log = logging.getLogger("kisse.access")
# Metrics label requests by route pattern (bounded), never by raw path.
ROUTE_OF = {handler: pattern for pattern, handler in default_handlers}
CLIENT_CLOSED = 499
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without the query string: `/ws?token=…` must never reach a log."""
    request = handler.request
    # 499 (as nginx says it): the client left before the answer; not a server fault.
    status = CLIENT_CLOSED if getattr(handler, "client_gone", False) else handler.get_status()
    level = logging.INFO if status < 500 or status == CLIENT_CLOSED else logging.ERROR
    seconds = request.request_time()
    # Tornado passes any method token through: logs and metric labels take known values only.
    method = request.method if request.method in KNOWN_METHODS else "other"
    access_log.log(level, "%s %s %d %.1fms", method, request.path, status, 1000.0 * seconds,
                   extra={"method": method, "path": request.path, "status": status})
    route = ROUTE_OF.get(type(handler), "unmatched")
    runtime(handler.application).metrics.http_latency.labels(route, method, str(status)).observe(seconds)


def make_app(settings: Settings, storage: Storage) -> tornado.web.Application:
    """Build the application; `await startup(app)` before serving."""
    rt = Runtime(settings=settings, storage=storage, tasks=Background(quiet=storage.unavailable_errors))
    rt.bus = make_bus(settings, rt.hub)
    rt.heartbeat = Heartbeat(settings.ws_ping)
    rt.hub.on_connection_added.append(rt.bus.connection_opened)
    rt.hub.on_connection_closed.append(rt.bus.connection_closed)
    rt.presence = PresenceTracker(rt)
    rt.typing = TypingTracker(rt)
    rt.calls = CallTimers(rt)
    rt.metrics = Metrics(rt.hub.count, lambda: rt.inflight)
    rt.metrics.bus_stats = lambda: getattr(rt.bus, "stats", {})
    rt.members = Members(storage)
    rt.blocks = Blocks(rt)
    rt.limits = Limits(settings, on_refusal=lambda name: rt.metrics.rate_limited.labels(name).inc())
    rt.forgetting = Forgetting(rt)
    rt.push = PushService(rt)
    rt.metrics.push_stats = lambda: {"depth": rt.push.depth(), **rt.push.stats}
    rt.bus.subscribe(rt.members.on_event, CONVERSATION_CHANGED)
    rt.bus.subscribe(rt.blocks.on_event, BLOCKS_CHANGED)
    return tornado.web.Application(
        default_handlers,
        kisse=rt,
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        # Heartbeat is handlers/ws.py's own: Tornado's waits 5 s more for a
        # close handshake a dead peer never answers.
        websocket_max_message_size=settings.max_ws_frame,
    )


def runtime(app: tornado.web.Application) -> Runtime:
    return app.settings["kisse"]


async def startup(app: tornado.web.Application) -> None:
    """Prepare storage (migrations, indexes) and logins; start the call sweep and the send repair."""
    rt = runtime(app)
    await rt.storage.start()
    await rt.bus.start()
    await auth.prepare(rt)
    rt.calls.start()
    rt.tasks.every(rt.settings.send_repair_after, lambda: messaging.repair_sends(rt), "send repair")
    rt.forgetting.start()
    rt.push.start()
    rt.tasks.every(limits.SWEEP_EVERY, rt.limits.sweep, "rate-limit sweep", first_after=limits.SWEEP_EVERY)
    rt.tasks.spawn(rt.heartbeat.run(), "heartbeat")


async def shutdown(app: tornado.web.Application, grace: float = 10.0) -> None:
    """Finish what was started, then stop: WebSockets take no new request and
    answer those they took, then close with 1001 (clients move to another
    node); REST requests in flight finish; only then does storage close. What
    the grace cuts short answers 503 storage_unavailable, never 500."""
    rt = runtime(app)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    connections = rt.hub.all()
    if connections:
        await asyncio.wait([loop.create_task(c.drain()) for c in connections], timeout=grace)
    rt.hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
    while rt.inflight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    rt.calls.stop()
    rt.presence.close()
    rt.typing.close()
    await rt.push.close()
    await rt.tasks.close()  # background work ends before the storage it uses
    await rt.bus.close()
    await rt.limits.close()
    await rt.storage.close()
