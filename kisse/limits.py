"""Abuse limits: how often a user, a device or a client address may do a thing.

Each limit is a setting in the `limits` library's notation (`KISSE_LIMIT_*`,
e.g. "60/10 seconds;2000/hour": a burst and a sustained rate) and is counted
in fixed windows by that library: exact Retry-After (the window's end), and
a counter per window. Counters live in this process, or in Redis when
`KISSE_BUS` is set, so every node of a cluster draws on one budget; a process
counts single units (a send) in leases of a twentieth of the limit and spends
them locally, so the relay path pays a dictionary lookup per send.

`KISSE_RATE_LIMITS=off` lifts them all (load tests). A Redis that cannot be
reached lifts them too, with a warning a minute: refusing every request
because the limiter is down would be an outage of its own.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import limits
import limits.aio.storage
import limits.aio.strategies
import limits.storage
import limits.strategies
from redis.exceptions import RedisError

from config.settings import Settings
from kisse.errors import RateLimited

log = logging.getLogger("kisse.limits")
WARN_EVERY = 60.0
SWEEP_EVERY = 60.0  # seconds between two sweeps of ended windows
REDIS_TIMEOUT = 1.0
LEASE_SHARE = 20    # a lease is 1/20th of a limit (none below 40: small limits are counted unit by unit)
LEASE_MAX = 100
LEASES_KEPT = 100_000
NAMES = ("login_ip", "login_user", "register_ip", "refresh", "password", "send", "upload_bytes", "claims",
         "claims_pair", "calls", "search", "ws_user", "ws_ip")
MESSAGES = {
    "login_ip": "too many failed logins from this address",
    "login_user": "too many failed logins for this account: it is locked for a while",
    "register_ip": "too many sign-ups from this address",
    "refresh": "this device refreshes its tokens too often",
    "password": "too many password changes",
    "send": "you are sending messages too fast",
    "upload_bytes": "you have uploaded too much content for now",
    "claims": "too many key claims",
    "claims_pair": "too many key claims for this user",
    "calls": "too many calls started",
    "search": "too many searches",
    "ws_user": "too many connections opened for this account",
    "ws_ip": "too many connections opened from this address",
}


class LocalCounters(limits.storage.MemoryStorage):
    """The library's in-process storage, without its expiry thread: it starts a
    `threading.Timer` on every increment to sweep every key, and that thread's fight
    for the GIL cost the relay 12 % of its throughput (measured, limits on vs off).
    An expired window is dropped when it is read anyway (`get`); `sweep` drops the
    rest now and then, from the event loop, so that memory stays bounded. (The
    names are the library's private ones: `limits` is pinned in requirements.txt.)"""

    def _MemoryStorage__schedule_expiry(self) -> None:
        pass

    def sweep(self) -> None:
        self._MemoryStorage__expire_events()


def _redis_url(bus: str) -> str:
    """`redis://…` (KISSE_BUS) as the `limits` library names its asyncio Redis storage."""
    return "async+" + bus if not bus.startswith("async+") else bus


class Limits:
    """`hit(name, *key)` spends one unit (or `cost`) of a limit, `spend` of several at
    once, `check` only looks; they raise `RateLimited` with an honest `retry_after`."""

    def __init__(self, settings: Settings, on_refusal: Callable[[str], Any] = lambda name: None) -> None:
        self.enabled = settings.rate_limits == "on"
        self._on_refusal = on_refusal  # a metric
        self._items = {name: limits.parse_many(getattr(settings, f"limit_{name}")) for name in NAMES}
        self._shared = bool(settings.bus)
        if self._shared:
            # Short timeouts: a Redis that hangs must not hang the requests it counts.
            storage = limits.aio.storage.RedisStorage(_redis_url(settings.bus), implementation="redispy",
                                                      key_prefix="kisse:limits", socket_timeout=REDIS_TIMEOUT,
                                                      socket_connect_timeout=REDIS_TIMEOUT)
            self._async = limits.aio.strategies.FixedWindowRateLimiter(storage)
        else:
            self._counters = LocalCounters()
            self._local = limits.strategies.FixedWindowRateLimiter(self._counters)
        self._warned_at = 0.0
        # Each window by its position: RateLimitItem hashes in Python, too slow for a send.
        self._windows = {name: [(n, item, max(1, min(LEASE_MAX, item.amount // LEASE_SHARE)))
                                for n, item in enumerate(items)] for name, items in self._items.items()}
        self._leases: dict[tuple[Any, ...], list[float]] = {}  # (name, n, key) -> [units left, window end]
        self._held: dict[tuple[str, tuple[str, ...]], list[list[float]]] = {}  # (name, key) -> its windows' leases

    async def hit(self, name: str, *key: str, cost: int = 1) -> None:
        await self.spend((name, key), cost=cost)

    async def spend(self, *limits_and_keys: tuple[str, tuple[str, ...]], cost: int = 1) -> None:
        """Spend `cost` of each window of each limit, or of none: a refused request
        gives back what it took."""
        if not self.enabled:
            return
        if cost == 1 and len(limits_and_keys) == 1:  # the hot path (a send): every window's lease has a unit
            held = self._held.get(limits_and_keys[0])
            if held is not None:
                now = time.time()
                if all(lease[0] >= 1 and lease[1] > now for lease in held):
                    for lease in held:
                        lease[0] -= 1
                    return
        spent: list[tuple[limits.RateLimitItem, str, tuple[str, ...], list[float] | None]] = []
        for name, key in limits_and_keys:
            for n, item, size in self._windows[name]:
                try:
                    allowed, lease = await self._take(item, name, key, cost, (name, n, key), size)
                except (RedisError, OSError) as error:
                    return self._unavailable(error)
                spent.append((item, name, key, lease))
                if not allowed:
                    refusal = await self._refusal(name, item, key)
                    for item_, name_, key_, lease_ in spent[:-1]:
                        if lease_ is not None:
                            lease_[0] += cost  # back into this process's lease
                        else:
                            await self._incr(item_, name_, key_, -cost)
                    await self._incr(item, name, key, -cost)
                    raise refusal
        if len(limits_and_keys) == 1 and all(lease is not None for *_, lease in spent):
            self._held[limits_and_keys[0]] = [lease for *_, lease in spent]  # type: ignore[misc]

    async def _take(self, item: limits.RateLimitItem, name: str, key: tuple[str, ...], cost: int,
                    slot_key: tuple[Any, ...], size: int) -> tuple[bool, list[float] | None]:
        """`(allowed, the lease it came from or None)`. Single units come out of a lease:
        this process counts 1/LEASE_SHARE of the limit in the shared window at once and
        spends it here, so a send costs a dictionary lookup, not a counter update (nor a
        Redis round trip). Counted before spent, a lease never lets a client past the
        limit; in a cluster, units another node leased and has not used yet may make a
        refusal come early."""
        if size == 1 or cost != 1:
            return await self._incr(item, name, key, cost), None
        lease = self._leases.get(slot_key)
        now = time.time()
        if lease is not None and lease[0] >= 1 and lease[1] > now:
            lease[0] -= 1
            return True, lease
        if await self._incr(item, name, key, size):
            window_end = await self._window_end(item, name, key)
            if len(self._leases) >= LEASES_KEPT:
                self._leases.clear()  # their units stay counted: a client loses some, never gains
                self._held.clear()
            self._leases[slot_key] = lease = [size - 1, window_end]
            return True, lease
        await self._incr(item, name, key, -size)  # no room for a lease: one unit, if any
        return await self._incr(item, name, key, 1), None

    async def _window_end(self, item: limits.RateLimitItem, name: str, key: tuple[str, ...]) -> float:
        stats: Any = (await self._async.get_window_stats(item, name, *key) if self._shared
                      else self._local.get_window_stats(item, name, *key))
        return stats.reset_time

    async def _incr(self, item: limits.RateLimitItem, name: str, key: tuple[str, ...], cost: int) -> bool:
        if self._shared:
            return await self._async.hit(item, name, *key, cost=cost)
        return self._local.hit(item, name, *key, cost=cost)

    async def check(self, name: str, *key: str) -> None:
        if not self.enabled:
            return
        for item in self._items[name]:
            try:
                allowed = (await self._async.test(item, name, *key) if self._shared
                           else self._local.test(item, name, *key))
            except (RedisError, OSError) as error:
                return self._unavailable(error)
            if not allowed:
                raise await self._refusal(name, item, key)

    async def _refusal(self, name: str, item: limits.RateLimitItem, key: tuple[str, ...]) -> RateLimited:
        self._on_refusal(name)
        try:
            stats: Any = (await self._async.get_window_stats(item, name, *key) if self._shared
                          else self._local.get_window_stats(item, name, *key))
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        except (RedisError, OSError):
            retry_after = max(1, item.get_expiry())
        return RateLimited(f"{MESSAGES[name]}: retry in {retry_after} s", details={"retry_after": retry_after})

    def _unavailable(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("rate limits are not enforced: their Redis cannot be reached (%s)", type(error).__name__)

    async def sweep(self) -> None:
        """Forget windows that ended (in-process counters; Redis expires its own keys)."""
        if not self._shared:
            self._counters.sweep()
        now = time.time()
        for slot_key in [k for k, lease in self._leases.items() if lease[1] <= now]:
            del self._leases[slot_key]
        for held_key in [k for k, held in self._held.items() if any(lease[1] <= now for lease in held)]:
            del self._held[held_key]

    async def close(self) -> None:
        """Close the Redis connections (the counters stay: they outlive a node)."""
        if self._shared:
            await self._async.storage.bridge.storage.aclose()
