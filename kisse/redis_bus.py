"""The Redis bus: several Kisse processes (nodes) on one Redis share live events.

Routing is by where users are connected, never a broadcast of every event:

* a **directory**: `kisse:user:<id>` is the set of nodes where that user is
  present (connected, or within KISSE_PRESENCE_GRACE of their last
  connection); `kisse:node:<id>:users` is the same from the node's side;
* **leases**: each node keeps `kisse:node:<id>:alive` (expiring after
  KISSE_BUS_LEASE) and renews it every third of that; a directory entry
  counts only while its node's lease lives;
* **one channel per node**, `kisse:to:<node>`: an event goes, once, to each
  other live node holding at least one of its recipients (users, or the one
  connection it is for), with just those recipients. `kisse:everywhere` is
  for the rare events every node must see (a cache to drop).

Per event: one pipelined read of the recipients' directory entries (two
users for a direct message) and one PUBLISH per remote node that has
recipients. Per connection: one SADD when a user's first connection on the
node opens, one SREM when their grace ends, and an HSET / HDEL of the
device session (push wake-ups go to devices connected nowhere). These
directory writes leave in batches too, one pipeline at a time, and so do
the directory reads of presence: a burst of connections opening costs a few
round trips on one Redis connection, not a command, a task and a pooled
connection each (the pool grew to the burst's concurrency). Events queue in
order, in one bounded queue, and leave in batches: a batch costs two round
trips whatever its size.

A node found dead (its lease gone) is reaped by one live node (a lock): its
users are removed from the directory, and those present nowhere else go
offline for their contacts. When Redis is away, events for this node's own
connections still flow, events for other nodes are counted as undelivered
(clients catch up with `sync`: the store is the record), `/readyz` says
`degraded`, and the node re-announces its users once Redis answers again.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from kisse.bus import Bus, Event
from kisse.hub import Hub
from storage.base import new_id

log = logging.getLogger("kisse.bus")

QUEUE_MAX = 10_000  # events waiting to leave; beyond, they are counted undelivered
BATCH_MAX = 512
EVERYWHERE = "kisse:everywhere"
NODES = "kisse:nodes"
REDIS_TIMEOUT = 2.0  # seconds a Redis command may take before the bus counts as degraded
CLOSE_WITHIN = 5.0  # seconds a stop waits for the bus's own tasks
WRITE_RETRY_AFTER = 0.1  # seconds between directory writes while Redis fails them


def _user_key(user_id: str) -> str:
    return f"kisse:user:{user_id}"


def _user_sessions(user_id: str) -> str:
    return f"kisse:user:{user_id}:sessions"  # hash: device session -> node holding a connection of it


def _node_users(node: str) -> str:
    return f"kisse:node:{node}:users"


def _alive_key(node: str) -> str:
    return f"kisse:node:{node}:alive"


def _channel(node: str) -> str:
    return f"kisse:to:{node}"


class RedisBus(Bus):
    name = "redis"

    def __init__(self, hub: Hub, settings: Any) -> None:
        super().__init__(hub)
        self.url = settings.bus
        self.lease = settings.bus_lease
        self.node = new_id()
        self.redis = redis.from_url(self.url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
        self.state = "starting"
        self.stats = {"published": 0, "received": 0, "undelivered": 0, "operations": 0}
        self._queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_MAX)
        self._alive: set[str] = set()
        # Nodes whose lease ran out, as of the last heartbeat. A node not known dead
        # counts as alive: a node that just started is routed to at once.
        self._dead: set[str] = set()
        self._present: set[str] = set()  # users this node has announced in the directory
        self._reannounce = False  # Redis was away: tell it again who is here
        self._tasks: list[asyncio.Task] = []
        # Directory writes not sent yet: a user joining (True) or leaving (False) this
        # node, a device session connected here (True) or no longer (False).
        self._users_due: dict[str, bool] = {}
        self._sessions_due: dict[tuple[str, str], bool] = {}
        self._written: asyncio.Future[None] | None = None  # resolved once the due writes are sent
        self._writer: asyncio.Task[None] | None = None
        # Directory reads waiting for the next pipeline (users, the caller's future).
        self._lookups: list[tuple[list[str], asyncio.Future[dict[str, set[str]]]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # HDEL only if the entry is still this node's: the device may have moved on.
        self._forget_session = self.redis.register_script(
            "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then"
            " return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0")

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._heartbeat()
            self.state = "ok"
        except (RedisError, OSError) as error:
            # Start anyway: local events flow, and the node joins once Redis answers.
            log.warning("redis bus unreachable at start (%s); retrying", type(error).__name__)
            self.state = "degraded"
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sender()), loop.create_task(self._receiver()),
                       loop.create_task(self._leases())]

    async def close(self) -> None:
        """Stop, leave the directory at once (others stop routing here without waiting
        for the lease), disconnect: each step bounded, so a stop never hangs on Redis."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WITHIN
        pending = set(self._tasks) | {t for t in (self._writer, self._reader) if t is not None}
        while pending and loop.time() < deadline:  # a cancellation inside a command may not take at once
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        if self._written is not None and not self._written.done():
            self._written.set_result(None)  # nobody waits on writes _leave makes moot
        for _, future in self._lookups:  # reads nobody will make now
            if not future.done():
                future.set_exception(RedisError("the bus is closed"))
        self._lookups = []
        for step in (self._leave, self.redis.aclose):
            try:
                await asyncio.wait_for(step(), REDIS_TIMEOUT)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass

    async def _leave(self) -> None:
        """Every entry of this node out of the directory: its users as Redis knows them
        (a departure Redis failed is there still) and as this node does, writes not sent
        included; then the node itself, so nobody waits for its lease."""
        users = list({u.decode() for u in await self.redis.smembers(_node_users(self.node))}
                     | self._present | self._users_due.keys())
        sessions = {(c.user_id, c.session_id) for c in self.hub.all()} | self._sessions_due.keys()
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in users:
                pipe.hgetall(_user_sessions(user_id))
            held = await pipe.execute()
        sessions |= {(u, s.decode()) for u, found in zip(users, held) for s, n in found.items()
                     if n.decode() == self.node}
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id, session_id in sessions:
                await self._forget_session(keys=[_user_sessions(user_id)], args=[session_id, self.node], client=pipe)
            for user_id in users:
                pipe.srem(_user_key(user_id), self.node)
            pipe.delete(_node_users(self.node), _alive_key(self.node))
            pipe.srem(NODES, self.node)
            await pipe.execute()

    def health(self) -> dict[str, Any]:
        return {"bus": self.name, "state": self.state, "node": self.node, "nodes_alive": len(self._alive),
                "queued": self._queue.qsize(), **self.stats}

    # -- the directory -------------------------------------------------------------
    async def joined(self, user_id: str) -> None:
        self._present.add(user_id)
        self._users_due[user_id] = True
        await asyncio.shield(self._write_soon())  # one caller cancelled must not cancel the batch for all

    async def left(self, user_id: str) -> None:
        self._present.discard(user_id)
        self._users_due[user_id] = False
        await asyncio.shield(self._write_soon())

    def _write_soon(self) -> asyncio.Future[None]:
        """The due directory writes go with the next batch: resolved once it is sent,
        or once Redis failed it (the bus is degraded then, and re-announces later)."""
        loop = asyncio.get_running_loop()
        if self._closed:  # closing: _leave removes what is due
            done = loop.create_future()
            done.set_result(None)
            return done
        if self._written is None:
            self._written = loop.create_future()
        if self._writer is None:
            self._writer = loop.create_task(self._write_directory())
        return self._written

    async def _write_directory(self) -> None:
        """Send the due writes, one pipeline at a time, until none is left."""
        try:
            while self._written is not None:
                written, self._written = self._written, None
                users, self._users_due = self._users_due, {}
                sessions, self._sessions_due = self._sessions_due, {}
                try:
                    await self._write(users, sessions)
                except (RedisError, OSError, asyncio.CancelledError) as error:
                    # Again with the next batch or once Redis is back (the lease renewal),
                    # unless a newer write for the same user or session came meanwhile;
                    # cancelled (closing): _leave takes them.
                    for user_id, here in users.items():
                        self._users_due.setdefault(user_id, here)
                    for session, here in sessions.items():
                        self._sessions_due.setdefault(session, here)
                    if isinstance(error, asyncio.CancelledError):
                        raise
                    self._degraded(error)
                    await asyncio.sleep(WRITE_RETRY_AFTER)
                except Exception:  # a bug: lose these writes (re-announced later), not the writer
                    log.exception("redis bus could not write the directory")
                    self._reannounce = True
                finally:
                    if not written.done():
                        written.set_result(None)
        finally:
            self._writer = None

    async def _write(self, users: dict[str, bool], sessions: dict[tuple[str, str], bool]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            joined = [u for u, here in users.items() if here]
            gone = [u for u, here in users.items() if not here]
            for user_id in joined:
                pipe.sadd(_user_key(user_id), self.node)
            for user_id in gone:
                pipe.srem(_user_key(user_id), self.node)
            if joined:
                pipe.sadd(_node_users(self.node), *joined)
            if gone:
                pipe.srem(_node_users(self.node), *gone)
            for (user_id, session_id), here in sessions.items():
                if here:
                    pipe.hset(_user_sessions(user_id), session_id, self.node)
                else:
                    await self._forget_session(keys=[_user_sessions(user_id)], args=[session_id, self.node],
                                               client=pipe)  # queued, like the rest
            # A command Redis refuses (a key of the wrong type) is logged and dropped, not
            # retried for ever; a lost connection still raises.
            refused = [r for r in await pipe.execute(raise_on_error=False) if isinstance(r, Exception)]
        if refused:
            log.warning("redis bus: %d directory writes refused (%s)", len(refused), refused[0])

    async def _lookup(self, user_ids: list[str]) -> dict[str, set[str]]:
        """`_nodes_of`, the reads of many callers sharing one pipeline at a time: a burst
        of connections (each asking where its user is present) costs a few round trips
        on one Redis connection, not a command and a pooled connection each."""
        if self._closed:
            raise RedisError("the bus is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, set[str]]] = loop.create_future()
        self._lookups.append((user_ids, future))
        if self._reader is None:
            self._reader = loop.create_task(self._read_directory())
        return await future

    async def _read_directory(self) -> None:
        try:
            while self._lookups:
                batch, self._lookups = self._lookups, []
                try:
                    nodes = await self._nodes_of(list(dict.fromkeys(u for users, _ in batch for u in users)))
                except (RedisError, OSError) as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(RedisError(f"directory read failed: {type(error).__name__}"))
                    continue
                except asyncio.CancelledError:  # closing: the callers get an answer they handle
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(RedisError("the bus is closed"))
                    raise
                for users, future in batch:
                    if not future.done():  # its caller may have given up
                        future.set_result({u: nodes[u] for u in users})
        finally:
            self._reader = None

    async def _nodes_of(self, user_ids: list[str]) -> dict[str, set[str]]:
        """The nodes of each user not known dead (this one included)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.smembers(_user_key(user_id))
            found = await pipe.execute()
        self.stats["operations"] += 1
        return {u: {n.decode() for n in nodes} - self._dead for u, nodes in zip(user_ids, found)}

    async def present(self, user_ids: Iterable[str]) -> set[str]:
        users = list(dict.fromkeys(user_ids))
        here = {u for u in users if self.hub.is_connected(u) or u in self._present}
        rest = [u for u in users if u not in here]
        if not rest or self.state != "ok":
            return here
        try:
            nodes = await self._lookup(rest)
        except (RedisError, OSError):
            return here
        return here | {u for u, n in nodes.items() if n}

    # -- which devices are connected (push wake-ups go to the others) -----------------
    def connection_opened(self, connection: Any) -> None:
        self._sessions_due[(connection.user_id, connection.session_id)] = True
        self._write_soon()

    def connection_closed(self, connection: Any) -> None:
        if connection.session_id in self.hub.sessions([connection.user_id]):
            return  # another connection of that device is still here
        self._sessions_due[(connection.user_id, connection.session_id)] = False
        self._write_soon()

    async def connected_sessions(self, user_ids: Iterable[str]) -> set[str]:
        users = list(dict.fromkeys(user_ids))
        here = self.hub.sessions(users)
        if not users or self.state != "ok":
            return here
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for user_id in users:
                    pipe.hgetall(_user_sessions(user_id))
                found = await pipe.execute()
        except (RedisError, OSError):
            return here
        self.stats["operations"] += 1
        # A dead node's entries linger: only a live lease makes an entry count (a node that
        # started since the last heartbeat is not counted yet: its devices may get a wake-up).
        return here | {s.decode() for sessions in found for s, node in sessions.items()
                       if node.decode() in self._alive and node.decode() != self.node}

    async def present_elsewhere(self, user_id: str) -> bool:
        try:
            return bool((await self._lookup([user_id]))[user_id] - {self.node})
        except (RedisError, OSError):
            return False

    # -- events ------------------------------------------------------------------
    def publish(self, event: Event) -> int:
        self.published(event)
        delivered = self.deliver(event)
        if event.conn is not None and delivered:
            return delivered  # the one connection it was for is here
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stats["undelivered"] += 1
        return delivered

    async def _sender(self) -> None:
        """Events leave in order, in batches: one directory read and one publish pipeline each."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._send(batch)
                self._ok()
            except (RedisError, OSError) as error:
                self.stats["undelivered"] += len(batch)
                self._degraded(error)
                await asyncio.sleep(0.1)
            except Exception:  # a bug (an event that does not encode): lose the batch, not the bus
                self.stats["undelivered"] += len(batch)
                log.exception("redis bus could not send %d events", len(batch))

    async def _send(self, batch: list[Event]) -> None:
        users = list(dict.fromkeys(u for e in batch if not e.everywhere for u in e.users))
        nodes = await self._nodes_of(users) if users else {}
        async with self.redis.pipeline(transaction=False) as pipe:
            published = 0
            for event in batch:
                if event.everywhere:
                    pipe.publish(EVERYWHERE, orjson.dumps({"from": self.node, "event": event.to_json()}))
                    published += 1
                    continue
                by_node: dict[str, list[str]] = {}
                for user_id in (event.users[:1] if event.conn or event.session else event.users):
                    for node in nodes.get(user_id, ()):
                        if node != self.node:
                            by_node.setdefault(node, []).append(user_id)
                for node, recipients in by_node.items():
                    part = Event(event.type, event.data, tuple(recipients), event.conn, event.exclude_conn,
                                 session=event.session)
                    pipe.publish(_channel(node), orjson.dumps({"from": self.node, "event": part.to_json()}))
                    published += 1
            if published:
                await pipe.execute()
                self.stats["operations"] += 1
                self.stats["published"] += published

    async def _receiver(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(_channel(self.node), EVERYWHERE)
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    try:
                        raw = orjson.loads(message["data"])
                        if raw["from"] == self.node:
                            continue  # our own `everywhere` event, delivered when published
                        event = Event.from_json(raw["event"])
                    except (ValueError, KeyError, TypeError):  # not one of ours: skip it, keep listening
                        log.warning("redis bus: a message that is no event on %s", message.get("channel"))
                        continue
                    self.stats["received"] += 1
                    self.deliver(event)
            except asyncio.CancelledError:
                await self._close_pubsub(pubsub)
                raise
            except (RedisError, OSError) as error:
                self._degraded(error)
                await self._close_pubsub(pubsub)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, self.lease / 3)

    @staticmethod
    async def _close_pubsub(pubsub: Any) -> None:
        try:
            await pubsub.aclose()
        except Exception:  # the connection is gone already
            pass

    # -- leases and reaping ----------------------------------------------------------
    async def _leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._heartbeat()
                self._ok()
            except (RedisError, OSError) as error:
                self._degraded(error)
            except Exception:  # a bug must not end the lease renewals (the node would be reaped)
                log.exception("redis bus heartbeat failed")

    async def _heartbeat(self) -> None:
        """Renew this node's lease, learn which nodes live, reap the dead ones."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(_alive_key(self.node), b"1", px=int(self.lease * 1000))
            pipe.sadd(NODES, self.node)
            pipe.smembers(NODES)
            *_, members = await pipe.execute()
        nodes = [n.decode() for n in members]
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.exists(_alive_key(node))
            alive = await pipe.execute()
        self._alive = {n for n, a in zip(nodes, alive) if a}
        self._dead = set(nodes) - self._alive - {self.node}
        if self._reannounce:  # Redis was away (or restarted, empty): tell it again who is here
            await self._write(dict.fromkeys(self._present, True),
                              {(c.user_id, c.session_id): True for c in self.hub.all()})
            self._reannounce = False
        if self._users_due or self._sessions_due:
            self._write_soon()  # writes Redis failed (a user who left, a device gone)
        for node in set(nodes) - self._alive:
            await self._reap(node)

    async def _reap(self, node: str) -> None:
        if not await self.redis.set(f"kisse:reap:{node}", self.node, nx=True, ex=60):
            return  # another node is reaping it
        users = [u.decode() for u in await self.redis.smembers(_node_users(node))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in users:
                pipe.hgetall(_user_sessions(user_id))
            sessions = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id, held in zip(users, sessions):
                gone = [s for s, n in held.items() if n.decode() == node]
                if gone:
                    pipe.hdel(_user_sessions(user_id), *gone)
                pipe.srem(_user_key(user_id), node)
            pipe.delete(_node_users(node))
            pipe.srem(NODES, node)
            await pipe.execute()
        log.warning("cluster node %s is gone (lease expired): %d users released", node, len(users))
        if users:
            nodes = await self._nodes_of(users)
            for user_id in users:
                if not nodes[user_id]:
                    for listener in self.on_user_gone:
                        listener(user_id)

    # -- state ---------------------------------------------------------------------
    def _ok(self) -> None:
        if self.state != "ok":
            log.warning("redis bus is back")
        self.state = "ok"

    def _degraded(self, error: BaseException) -> None:
        self._reannounce = True
        if self.state != "degraded":
            log.warning("redis bus degraded: %s", type(error).__name__)
        self.state = "degraded"
