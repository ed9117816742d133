"""Push wake-ups: a device with no live connection hears, through its platform's
push service, that something happened: a message (`wake`), an incoming call
(`call`, urgent), the end of a call that was ringing it (`call_end`). Nothing
more (kisse/push/provider.py): the app connects and `sync`s.

The dispatcher watches the domain events this process publishes (`message.new`,
`call.incoming`, `call.state`): the node that publishes an event is the one that
pushes for it, so a cluster pushes once. Sending is off the request path: a
bounded queue, a few workers, a timeout on every request, retries with backoff
(honouring Retry-After), a registration the provider declares dead is dropped.
A burst of messages wakes a device once per `KISSE_PUSH_COALESCE` seconds, and
a full queue drops the oldest wake-ups first (calls are kept).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from kisse.bus import PUSH_CHANGED, Event
from kisse.push.provider import Provider, Result, Wake
from kisse.runtime import Runtime
from storage.base import Record

log = logging.getLogger("kisse.push")
RETRIES = 4            # attempts after the first, for a `retry` answer
BACKOFF = (1.0, 2.0, 5.0, 15.0)
CACHE_SIZE = 100_000   # users whose registrations are kept in process
CACHE_FOR = 60.0       # seconds: a device whose session expired leaves the cache by then
# A message wake-up may wait a day for a phone that is off; the platform keeps the latest one.
MESSAGE_WAKE = Wake("wake", ttl=24 * 3600, collapse="wake")


def _stops_ringing(call: dict[str, Any]) -> bool:
    """A call that rang and is over: answered (somewhere), refused, missed, or cancelled
    while ringing. (A call that was busy never rang; one that ends after an answer
    stopped ringing when it was answered.)"""
    status = call.get("status")
    return status in ("accepted", "rejected", "missed") or (status == "ended" and not call.get("answered_at"))


def make_providers(settings: Any) -> dict[str, Provider]:
    """The providers the settings turn on (credentials present)."""
    providers: dict[str, Provider] = {}
    from kisse.push import apns, fcm, webpush
    for module, cls in ((fcm, "FCM"), (apns, "APNs"), (webpush, "WebPush")):
        kind = getattr(module, cls)
        try:
            if kind.enabled(settings):
                provider = kind(settings)
                providers[provider.name] = provider
        except webpush.WebPushOff as off:
            log.warning("Web Push is off: %s", off)
        except Exception as error:  # a broken credential turns that provider off, loudly
            log.error("push provider %s is off: %s", cls, error)
    apns_settings = (settings.push_apns_key, settings.push_apns_key_id, settings.push_apns_team_id,
                     settings.push_apns_topic)
    if any(apns_settings) and not all(apns_settings):
        log.warning("APNs is off: set all of KISSE_PUSH_APNS_KEY, _KEY_ID, _TEAM_ID and _TOPIC")
    return providers


@dataclass(slots=True)
class Job:
    """One push to one device."""

    user_id: str
    session_id: str
    registration: Record
    wake: Wake
    attempt: int = 0
    not_before: float = field(default=0.0)


class PushService:
    def __init__(self, rt: Runtime, providers: dict[str, Provider] | None = None) -> None:
        self.rt = rt
        self.providers = make_providers(rt.settings) if providers is None else providers
        settings = rt.settings
        self._coalesce = settings.push_coalesce
        self._max = settings.push_queue
        # Due now: message wake-ups, one per device at most, oldest first; calls and their
        # ends in a queue of their own, never dropped for wake-ups. Not due yet (a wake-up
        # at the end of its coalescing window, a retry): a heap by due time.
        self._wakes: OrderedDict[str, Job] = OrderedDict()
        self._calls: deque[Job] = deque()
        self._later: list[tuple[float, int, Job]] = []
        self._waking: set[str] = set()  # sessions with a wake-up queued, due or not
        self._count = itertools.count()
        self._ready = asyncio.Event()
        self._woken_at: dict[str, float] = {}       # session -> when it was last sent a wake-up
        self._plans: deque[tuple[list[str], Wake]] = deque()       # events to turn into jobs
        self._workers: list[asyncio.Task[None]] = []
        # Registrations by user: a message to users who have none (or whose devices are all
        # connected) costs no storage read. Every change goes through `changed` (all nodes).
        self._cache: dict[str, tuple[float, list[Record]]] = {}
        self._version = 0
        self.stats = {"dropped_wakes": 0, "dropped_registrations": 0}

    @property
    def enabled(self) -> bool:
        return bool(self.providers)

    def depth(self) -> int:
        return len(self._wakes) + len(self._calls) + len(self._later) + len(self._plans)

    def start(self) -> None:
        if not self.enabled:
            return
        self.rt.bus.on_publish.append(self.on_published)
        self.rt.bus.subscribe(self._on_changed, PUSH_CHANGED)
        for n in range(self.rt.settings.push_workers):
            self._workers.append(asyncio.get_running_loop().create_task(self._work(), name=f"push worker {n}"))

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for provider in self.providers.values():
            await provider.close()

    # -- what to push ---------------------------------------------------------------
    def on_published(self, event: Event) -> None:
        """A bus hook, at publish time on the publishing node: cheap, the planning is a task."""
        kind = event.type
        if kind == "message.new":
            sender = event.data.get("sender_id")
            users = [u for u in event.users if u != sender]
            if users:
                self._plan_later(users, MESSAGE_WAKE)
        elif kind == "call.incoming":
            call = event.data
            wake = Wake("call", call_id=call["id"], urgent=True, ttl=max(1, int(self.rt.settings.call_ring_timeout)),
                        collapse=f"call-{call['id']}")
            self._plan_later(list(event.users), wake)
        elif kind == "call.state" and _stops_ringing(event.data):
            call = event.data  # whichever node it ends on: the callee's sleeping devices stop ringing
            self._plan_later([call["callee_id"]], Wake("call_end", call_id=call["id"], urgent=True, ttl=60,
                                                       collapse=f"call-{call['id']}"))

    def _plan_later(self, user_ids: list[str], wake: Wake) -> None:
        """Planning reads storage: a worker does it, the request goes on. Users known to
        have no registration cost nothing more (the relay's case)."""
        now = time.monotonic()
        cache, waking = self._cache, self._waking
        if wake.kind == "wake" and all(
                (cached := cache.get(u)) is not None and cached[0] > now
                and all(t["session_id"] in waking for t in cached[1]) for u in user_ids):
            return  # no device registered, or each has a wake-up on its way already
        if len(self._plans) >= self._max and wake.kind == "wake":
            self.stats["dropped_wakes"] += 1  # a backlog drops message wake-ups, never calls
            return
        self._plans.append((user_ids, wake))
        self._ready.set()

    # -- which devices are registered (cached) ----------------------------------------
    def changed(self, user_ids: list[str]) -> None:
        """A registration of these users changed (set, cleared, dropped, device gone): every
        process forgets them."""
        self.rt.bus.changed(PUSH_CHANGED, {"user_ids": user_ids})

    def _on_changed(self, event: Event) -> None:
        self._version += 1
        for user_id in event.data["user_ids"]:
            self._cache.pop(user_id, None)

    async def _registrations(self, user_ids: list[str]) -> list[Record]:
        now = time.monotonic()
        found, missing = [], []
        for user_id in user_ids:
            cached = self._cache.get(user_id)
            if cached is not None and cached[0] > now:
                found += cached[1]
            else:
                missing.append(user_id)
        if missing:
            version = self._version
            fresh = await self.rt.storage.push_registrations(missing)
            if version == self._version:  # nothing was forgotten meanwhile: keep what was read
                by_user: dict[str, list[Record]] = {u: [] for u in missing}
                for target in fresh:
                    by_user[target["user_id"]].append(target)
                if len(self._cache) + len(by_user) > CACHE_SIZE:
                    self._cache.clear()
                for user_id, targets in by_user.items():
                    self._cache[user_id] = (now + CACHE_FOR, targets)
            found += fresh
        return found

    async def _plan(self, user_ids: list[str], wake: Wake) -> None:
        targets = await self._registrations(user_ids)
        if not targets:
            return
        connected = await self.rt.bus.connected_sessions(user_ids)
        now = time.monotonic()
        for target in targets:
            session_id, registration = target["session_id"], target["push"]
            if session_id in connected or registration.get("provider") not in self.providers:
                continue
            if wake.kind == "wake":
                if session_id in self._waking:
                    continue  # a wake-up is on its way: the app syncs everything anyway
                # Woken moments ago: one more at the end of the window, not now (the app may
                # have gone back to sleep since, and this message must not wait for the next).
                due = self._woken_at.get(session_id, -1e9) + self._coalesce
                self._woken_at[session_id] = max(now, due)
                self._enqueue(Job(target["user_id"], session_id, registration, wake, not_before=due))
            else:
                self._enqueue(Job(target["user_id"], session_id, registration, wake))
        if len(self._woken_at) > 10 * self._max:  # forget old coalescing marks
            cutoff = now - self._coalesce
            self._woken_at = {s: t for s, t in self._woken_at.items() if t > cutoff}

    def _enqueue(self, job: Job) -> None:
        is_wake = job.wake.kind == "wake"
        if is_wake:
            while self.depth() >= self._max and self._wakes:
                _, dropped = self._wakes.popitem(last=False)  # the oldest wake-up goes first; calls stay
                self._waking.discard(dropped.session_id)
                self.stats["dropped_wakes"] += 1
            if self.depth() >= self._max:
                self.stats["dropped_wakes"] += 1
                return
            self._waking.add(job.session_id)
        if job.not_before > time.monotonic():
            heapq.heappush(self._later, (job.not_before, next(self._count), job))
        elif is_wake:
            self._wakes[job.session_id] = job
        else:
            self._calls.append(job)
        self._ready.set()

    # -- sending ----------------------------------------------------------------------
    def _next(self) -> Job | None:
        """The next job due: calls first, then the oldest wake-up."""
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            job = heapq.heappop(self._later)[2]
            if job.wake.kind == "wake":
                self._wakes[job.session_id] = job
            else:
                self._calls.append(job)
        if self._calls:
            return self._calls.popleft()
        if self._wakes:
            job = self._wakes.popitem(last=False)[1]
            self._waking.discard(job.session_id)
            return job
        return None

    async def _work(self) -> None:
        while True:
            if self._plans:
                try:
                    await self._plan(*self._plans.popleft())
                except asyncio.CancelledError:
                    raise
                except Exception:  # storage down: those wake-ups are lost, not the worker
                    log.warning("push planning failed", exc_info=True)
                continue
            job = self._next()
            if job is None:
                self._ready.clear()
                wait = self._later[0][0] - time.monotonic() if self._later else None
                try:
                    await asyncio.wait_for(self._ready.wait(), timeout=wait)  # or the next one comes due
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self._send(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("push failed")

    async def _send(self, job: Job) -> None:
        provider = self.providers[job.registration["provider"]]
        started = time.monotonic()
        result: Result = await provider.send(job.registration, job.wake)
        self.rt.metrics.pushes.labels(provider.name, job.wake.kind, result.outcome).inc()
        self.rt.metrics.push_latency.labels(provider.name).observe(time.monotonic() - started)
        if result.outcome == "dead":
            await self.rt.storage.drop_push(job.session_id, job.registration)
            self.changed([job.user_id])
            self.stats["dropped_registrations"] += 1
            log.info("push registration dropped", extra={"provider": provider.name, "status": result.status,
                                                        "reason": result.reason})
        elif result.outcome == "retry" and job.attempt < RETRIES:
            delay = max(result.retry_after or 0.0, BACKOFF[min(job.attempt, len(BACKOFF) - 1)])
            if job.wake.kind == "call" and delay >= job.wake.ttl:
                return  # it would ring after the call is over
            job.attempt += 1
            job.not_before = time.monotonic() + delay
            if job.wake.kind != "wake" or job.session_id not in self._waking:  # else a newer one goes
                self._enqueue(job)
        elif result.outcome != "sent":
            log.warning("push not delivered", extra={"provider": provider.name, "status": result.status,
                                                     "reason": result.reason})


