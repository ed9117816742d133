"""The load generator: one scenario per process, apart from the servers it measures.

Run by the runner as `python -m benchmarks.load SCENARIO PARAMS.json RESULT.json`.
Clients: aiohttp for WebSockets and setup calls (its frame reader is compiled),
and a raw asyncio HTTP/1.1 keep-alive client for the request-rate scenarios,
which costs far less CPU per request than any full client library. Every
scenario is bounded in count and in time and talks to 127.0.0.1 only.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any

import aiohttp

from benchmarks.procs import HOST, cpu_seconds, outbound_connections, own_cpu_seconds, proc_status, raise_nofile, rss

perf = time.perf_counter
PASSWORD = "benchmark-password"
CIPHERTEXT = base64.b64encode(b"\x17" * 64).decode()  # a 64-byte opaque message
MIB = 1024 * 1024


# -- measuring -----------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {"count": len(ms), "p50_ms": _r(pct(ms, 50)), "p90_ms": _r(pct(ms, 90)),
            "p99_ms": _r(pct(ms, 99)), "max_ms": _r(max(ms) if ms else None)}


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class CpuMeter:
    """CPU used by this client process and by the server over a window, in % of one core."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def start(self) -> None:
        self.t0, self.c0, self.s0 = perf(), own_cpu_seconds(), cpu_seconds(self.server_pid)

    def stop(self) -> dict[str, float]:
        wall = perf() - self.t0
        return {"wall_s": round(wall, 3),
                "client_cpu_pct": round(100 * (own_cpu_seconds() - self.c0) / wall, 1),
                "server_cpu_pct": round(100 * (cpu_seconds(self.server_pid) - self.s0) / wall, 1)}


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every few ms in a thread (the event loop may be busy)."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop_flag = threading.Event()

    def run(self) -> None:
        while not self._stop_flag.is_set():
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, KeyError):
                return
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = rss(self.pid)

    def stop(self) -> int:
        self._stop_flag.set()
        self.join(2)
        return self.peak


async def bounded_gather(n: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run coroutine factories with at most `n` at a time; exceptions are returned, not raised."""
    gate = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()
    return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)


# -- the Kisse API ---------------------------------------------------------------
class Kisse:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base
        self.ws_base = base.replace("http://", "ws://")

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None,
                   expect: tuple[int, ...] = (200, 201)) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.base + path, json=body, headers=headers) as response:
            data = await response.json(content_type=None)
            if response.status not in expect:
                raise RuntimeError(f"{method} {path} -> {response.status} {data}")
            return data

    async def register(self, username: str) -> tuple[str, str]:
        data = await self.call("POST", "/api/auth/register", body={"username": username, "password": PASSWORD})
        return data["token"], data["user"]["id"]

    async def conversation(self, token: str, other_id: str) -> str:
        data = await self.call("POST", "/api/conversations", token, {"participant_ids": [other_id]})
        return data["conversation"]["id"]

    async def connect(self, token: str) -> aiohttp.ClientWebSocketResponse:
        """Open /ws, send `sync` and wait for its ack: connected, authenticated, caught up."""
        ws = await self.session.ws_connect(f"{self.ws_base}/ws?token={token}", compress=0, autoping=True,
                                           heartbeat=None, max_msg_size=0)
        await ws.send_str('{"type":"sync","id":"s","data":{}}')
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"ws closed during sync: {msg}")
            frame = json.loads(msg.data)
            if frame.get("id") == "s":
                if frame["type"] != "ack":
                    raise RuntimeError(f"sync failed: {frame}")
                return ws


def make_session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}{random.randrange(10**6)}"


async def close_all(sockets: list[aiohttp.ClientWebSocketResponse]) -> None:
    async def close(ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await asyncio.wait_for(ws.close(), 3)
        except Exception:
            pass
    await bounded_gather(200, [lambda ws=ws: close(ws) for ws in sockets])


# -- relay -----------------------------------------------------------------------
async def accept_requests(api: "Kisse", users: list[Any], convs: list[Any], concurrency: int) -> None:
    """User 2i+1 accepts conversation i: a new direct conversation is a message request
    for the second user, and a request hears no receipts (kisse/contacts.py), so
    without this B's `message.delivered` never reaches A as a `message.receipt`."""
    done = await bounded_gather(concurrency, [
        lambda i=i: api.call("POST", f"/api/conversations/{convs[i]}/accept", users[2 * i + 1][0], {})
        for i in range(len(convs))])
    for d in done:
        if isinstance(d, BaseException):
            raise d


async def register_pairs(api: "Kisse", pairs: int) -> tuple[list[Any], list[Any]]:
    """2 * pairs fresh users and one accepted direct conversation per pair (users 2i and 2i+1)."""
    tag = unique("r")
    users = await bounded_gather(16, [lambda i=i: api.register(f"{tag}_{i}") for i in range(2 * pairs)])
    for u in users:
        if isinstance(u, BaseException):
            raise u
    convs = await bounded_gather(16, [lambda i=i: api.conversation(users[2 * i][0], users[2 * i + 1][1])
                                      for i in range(pairs)])
    for c in convs:
        if isinstance(c, BaseException):
            raise c
    await accept_requests(api, users, convs, 16)
    return users, convs


async def relay(p: dict[str, Any]) -> dict[str, Any]:
    """N pairs; A sends, B receives and acknowledges delivery; at most `window` in flight per pair."""
    kind, pairs, window = p["target"], p["pairs"], p["window"]
    if p.get("client", "picows") == "picows":
        return await relay_picows(p)
    async with make_session() as session:
        api = Kisse(session, p["base"])
        sockets: list[tuple[Any, Any, str]] = []
        if kind == "kisse":
            users, convs = await register_pairs(api, pairs)
            wss = await bounded_gather(32, [lambda u=u: api.connect(u[0]) for u in users])
            for item in [*convs, *wss]:
                if isinstance(item, BaseException):
                    raise item
            sockets = [(wss[2 * i], wss[2 * i + 1], convs[i]) for i in range(pairs)]
        else:
            async def bare(i: int, side: str) -> Any:
                return await session.ws_connect(f"{api.ws_base}/ws?pair={i}&side={side}", compress=0,
                                                heartbeat=None, max_msg_size=0)
            for i in range(pairs):
                sockets.append((await bare(i, "a"), await bare(i, "b"), f"c{i}"))

        deliveries: list[tuple[float, float]] = []
        stop = asyncio.Event()
        max_per_pair = p["max_messages"] // pairs
        gates = [asyncio.Semaphore(window) for _ in range(pairs)]
        sent_at: dict[str, float] = {}
        errors: list[str] = []

        async def sender(i: int) -> None:
            ws_a, _, conv = sockets[i]
            for k in range(max_per_pair):
                await gates[i].acquire()
                if stop.is_set():
                    return
                cmid = f"p{i}-{k}"
                sent_at[cmid] = perf()
                await ws_a.send_str('{"type":"message.send","id":%d,"data":{"conversation_id":"%s",'
                                    '"client_message_id":"%s","ciphertext":"%s"}}' % (k, conv, cmid, CIPHERTEXT))

        async def receiver(i: int) -> None:
            ws_b = sockets[i][1]
            n = 0
            async for msg in ws_b:
                frame = json.loads(msg.data)
                if frame["type"] == "message.new" or (kind == "bare" and frame["type"] == "message.send"):
                    now = perf()
                    data = frame["data"]
                    t0 = sent_at.pop(data["client_message_id"], None)
                    if t0 is not None:
                        deliveries.append((now, now - t0))
                    gates[i].release()
                    n += 1
                    await ws_b.send_str('{"type":"message.delivered","id":%d,"data":{"message_id":"%s"}}'
                                        % (n, data.get("id", data["client_message_id"])))
                elif frame["type"] == "error":
                    errors.append(msg.data[:300])

        async def drain(ws: Any) -> None:  # A's acks and receipts
            async for msg in ws:
                if '"type":"error"' in msg.data:
                    errors.append(msg.data[:300])

        meter = CpuMeter(p["server_pid"])
        tasks = [asyncio.ensure_future(f(i)) for i in range(pairs) for f in (sender, receiver)]
        tasks += [asyncio.ensure_future(drain(s[0])) for s in sockets]
        await asyncio.sleep(p["warmup"])
        t_start = perf()
        meter.start()
        done_at = t_start + p["duration"]
        while perf() < done_at and not all(t.done() for t in tasks[::2]):
            await asyncio.sleep(0.05)
        t_end = perf()
        cpu = meter.stop()
        stop.set()
        for gate in gates:  # wake senders blocked on a full window
            gate.release()
        await asyncio.sleep(0.5)
        await close_all([ws for s in sockets for ws in s[:2]])
        for t in tasks:
            t.cancel()
        window_lat = [lat for (t, lat) in deliveries if t_start <= t <= t_end]
        return {"target": kind, "client": "aiohttp", "pairs": pairs, "window": window, "measured_s": round(t_end - t_start, 3),
                "delivered": len(window_lat), "msgs_per_s": round(len(window_lat) / (t_end - t_start), 1),
                "latency": latency_summary(window_lat), "cpu": cpu, "errors": errors[:5],
                "error_count": len(errors)}


async def relay_picows(p: dict[str, Any]) -> dict[str, Any]:
    """`relay` with the picows client (the default): setup over aiohttp, load over picows."""
    from benchmarks import fastws
    kind, pairs = p["target"], p["pairs"]
    ws_base = p["base"].replace("http://", "ws://")
    urls: list[tuple[str, str, str]] = []
    if kind == "kisse":
        async with make_session() as session:
            api = Kisse(session, p["base"])
            users, convs = await register_pairs(api, pairs)
            urls = [(f"{ws_base}/ws?token={users[2 * i][0]}", f"{ws_base}/ws?token={users[2 * i + 1][0]}", convs[i])
                    for i in range(pairs)]
    else:
        urls = [(f"{ws_base}/ws?pair={i}&side=a", f"{ws_base}/ws?pair={i}&side=b", f"c{i}") for i in range(pairs)]
    out = await fastws.run(p, urls, CIPHERTEXT, lambda: CpuMeter(p["server_pid"]))
    t_start, t_end = out["t_start"], out["t_end"]
    window_lat = [lat for (t, lat) in out["deliveries"] if t_start <= t <= t_end]
    return {"target": kind, "client": "picows", "pairs": pairs, "window": p["window"],
            "measured_s": round(t_end - t_start, 3), "delivered": len(window_lat),
            "msgs_per_s": round(len(window_lat) / (t_end - t_start), 1), "latency": latency_summary(window_lat),
            "cpu": out["cpu"], "receipts": out["receipts"], "errors": out["errors"][:5],
            "error_count": len(out["errors"])}


# -- idle connections ------------------------------------------------------------
async def idle(p: dict[str, Any]) -> dict[str, Any]:
    """Open `count` idle WebSockets (authenticated and synced for Kisse); RSS per connection."""
    kind, count, pid = p["target"], p["count"], p["server_pid"]
    async with make_session() as session:
        api = Kisse(session, p["base"])
        tokens: list[Any] = []
        t0 = perf()
        if kind == "kisse":
            tag = unique("i")
            tokens = await bounded_gather(16, [lambda i=i: api.register(f"{tag}_{i}") for i in range(count)])
            tokens = [t[0] for t in tokens if not isinstance(t, BaseException)]
        setup_s = perf() - t0
        await asyncio.sleep(p["settle"])
        port = int(p["base"].rsplit(":", 1)[1])
        rss_before, outbound_before = rss(pid), outbound_connections(pid, port)

        async def one(i: int) -> Any:
            if kind == "kisse":
                return await api.connect(tokens[i])
            return await session.ws_connect(f"{api.ws_base}/ws?pair={i}&side=a", compress=0, heartbeat=None)
        total = min(count, len(tokens)) if kind == "kisse" else count
        half = total // 2
        # In two halves, RSS read after each: the second half's growth is what one more
        # idle connection costs, without what the first connections' burst left behind
        # for good (a storage pool grown to the burst's concurrency, allocator arenas).
        t0 = perf()
        results = await bounded_gather(64, [lambda i=i: one(i) for i in range(half)])
        await asyncio.sleep(2 * p["settle"])  # let presence updates and buffers settle
        rss_mid = rss(pid)
        results += await bounded_gather(64, [lambda i=i: one(i) for i in range(half, total)])
        connect_s = perf() - t0
        sockets = [r for r in results if not isinstance(r, BaseException)]
        failures = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
        await asyncio.sleep(2 * p["settle"])
        rss_after, outbound_after = rss(pid), outbound_connections(pid, port)
        second_half = sum(1 for r in results[half:] if not isinstance(r, BaseException))
        status = proc_status(pid)
        await close_all(sockets)
        opened = len(sockets)
        return {"target": kind, "requested": count, "connected": opened, "failures": len(failures),
                "first_failures": failures[:3], "setup_s": round(setup_s, 2), "connect_s": round(connect_s, 2),
                "rss_before": rss_before, "rss_mid": rss_mid, "rss_after": rss_after, "vm_hwm": status["VmHWM"],
                "bytes_per_conn": round((rss_after - rss_before) / opened) if opened else None,
                "marginal_bytes_per_conn": round((rss_after - rss_mid) / second_half) if second_half else None,
                # The server's own connections (storage pool, Redis): they grow with the
                # connect burst's concurrency, a fixed cost that weighs on the figure above.
                "outbound_before": outbound_before, "outbound_after": outbound_after}


# -- login storm -------------------------------------------------------------------
async def login_storm(p: dict[str, Any]) -> dict[str, Any]:
    """Ping RTT over WS while idle, then while `logins` bcrypt logins run concurrently."""
    async with make_session() as session:
        api = Kisse(session, p["base"])
        tag = unique("l")
        (token, _), (_, _) = await asyncio.gather(api.register(f"{tag}_p"), api.register(f"{tag}_s"))
        ws = await api.connect(token)
        pongs: dict[int, asyncio.Future[float]] = {}

        async def reader() -> None:
            async for msg in ws:
                frame = json.loads(msg.data)
                if frame["type"] == "pong":
                    future = pongs.pop(frame["id"], None)
                    if future is not None and not future.done():
                        future.set_result(perf())

        reader_task = asyncio.ensure_future(reader())
        samples: list[tuple[float, float]] = []
        counter = iter(range(10**9))
        loop = asyncio.get_running_loop()

        async def ping_until(stop: asyncio.Event, limit: int) -> None:
            for _ in range(limit):
                if stop.is_set():
                    return
                n = next(counter)
                future: asyncio.Future[float] = loop.create_future()
                pongs[n] = future
                t0 = perf()
                await ws.send_str('{"type":"ping","id":%d}' % n)
                t1 = await asyncio.wait_for(future, 10)
                samples.append((t0, t1 - t0))
                await asyncio.sleep(p["interval"])

        # Idle: the same pinging with nothing else going on.
        idle_stop = asyncio.Event()
        loop.call_later(p["idle_s"], idle_stop.set)
        await ping_until(idle_stop, p["max_pings"])
        idle_rtts = [rtt for _, rtt in samples]
        samples.clear()

        storm_stop = asyncio.Event()
        pinger = asyncio.ensure_future(ping_until(storm_stop, p["max_pings"]))
        meter = CpuMeter(p["server_pid"])
        meter.start()
        t_storm = perf()
        statuses: list[Any] = []
        async with make_session(limit=0) as storm_session:
            async def login() -> int:
                async with storm_session.post(p["base"] + "/api/auth/login",
                                              json={"username": f"{tag}_s", "password": PASSWORD}) as r:
                    await r.read()
                    return r.status
            statuses = await asyncio.wait_for(
                asyncio.gather(*(login() for _ in range(p["logins"])), return_exceptions=True), p["timeout"])
        t_done = perf()
        cpu = meter.stop()
        storm_stop.set()
        await pinger
        storm_rtts = [rtt for t0, rtt in samples if t_storm <= t0 <= t_done]
        reader_task.cancel()
        await ws.close()
        ok = sum(1 for s in statuses if s == 200)
        return {"logins": p["logins"], "logins_ok": ok, "storm_s": round(t_done - t_storm, 3),
                "logins_per_s": round(ok / (t_done - t_storm), 2),
                "idle": latency_summary(idle_rtts), "storm": latency_summary(storm_rtts), "cpu": cpu,
                "statuses": sorted({str(s) for s in statuses})}


# -- blob ------------------------------------------------------------------------------
async def blob(p: dict[str, Any]) -> dict[str, Any]:
    """Stream `size` bytes up to a message's content and back; server RSS growth each way."""
    size, chunk, pid = p["size"], p["chunk"], p["server_pid"]
    block = os.urandom(chunk)
    async with make_session() as session:
        api = Kisse(session, p["base"])
        tag = unique("b")
        (ta, _), (_, ub) = await asyncio.gather(api.register(f"{tag}_a"), api.register(f"{tag}_b"))
        conv = await api.conversation(ta, ub)
        message = (await api.call("POST", "/api/messages", ta, {"conversation_id": conv,
                                                                 "client_message_id": "blob-1"}))["message"]
        await asyncio.sleep(0.5)
        auth = {"Authorization": f"Bearer {ta}"}
        url = f"{p['base']}/api/messages/{message['id']}/content"

        async def body() -> Any:
            left = size
            while left > 0:
                piece = block if left >= chunk else block[:left]
                left -= len(piece)
                yield piece

        rss_before = rss(pid)
        sampler = RssSampler(pid)
        sampler.start()
        meter = CpuMeter(pid)
        meter.start()
        t0 = perf()
        try:
            async with session.post(url, data=body(), headers={**auth, "Content-Type": "application/octet-stream",
                                                               "Content-Length": str(size)}) as r:
                up_status, up_body = r.status, (await r.text())[:300]
        except (aiohttp.ClientError, OSError) as error:  # the server may reset the connection mid-body
            up_status, up_body = -1, repr(error)[:300]
        up_s = perf() - t0
        if up_status not in (200, 201):
            sampler.stop()
            return {"size": size, "upload_status": up_status, "upload_body": up_body, "failed": True}
        up_cpu = meter.stop()
        up_peak = max(sampler.peak, rss(pid))
        await asyncio.sleep(0.5)
        rss_after_up = rss(pid)
        sampler.reset()
        received = 0
        meter.start()
        t0 = perf()
        async with session.get(url, headers=auth) as r:
            down_status = r.status
            async for piece in r.content.iter_chunked(1 << 20):
                received += len(piece)
        down_s = perf() - t0
        down_cpu = meter.stop()
        down_peak = max(sampler.stop(), rss(pid))
        status = proc_status(pid)
        upload_excess = up_peak - rss_before - (size if up_status in (200, 201) else 0)
        return {"size": size, "upload_status": up_status, "upload_body": up_body if up_status >= 300 else "",
                "download_status": down_status, "downloaded": received,
                "upload_mb_s": round(size / MIB / up_s, 1), "download_mb_s": round(received / MIB / down_s, 1),
                "rss_before": rss_before, "upload_peak_rss": up_peak, "rss_after_upload": rss_after_up,
                "download_peak_rss": down_peak, "vm_hwm": status["VmHWM"],
                "upload_growth_beyond_blob": upload_excess,
                "download_growth": down_peak - rss_after_up,
                "peak_growth_beyond_blob": max(upload_excess, down_peak - rss_after_up),
                "cpu_upload": up_cpu, "cpu_download": down_cpu}


# -- raw HTTP client --------------------------------------------------------------
async def http_loop(port: int, request: bytes, stop_at: float, max_requests: int,
                    out: list[float], statuses: dict[int, int]) -> None:
    """One keep-alive connection issuing `request` back to back until time or count runs out."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for _ in range(max_requests):
            if perf() >= stop_at:
                return
            t0 = perf()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            length = int(lower[at + 17:lower.find(b"\r\n", at + 2)]) if at >= 0 else 0
            await reader.readexactly(length)
            out.append(perf() - t0)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


def build_get(path: str, token: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def http_load(port: int, requests: list[bytes], concurrency: int, duration: float, warmup: float,
                    max_requests: int, server_pid: int) -> dict[str, Any]:
    """Closed loop: `concurrency` connections, each sending its request back to back."""
    if warmup > 0:
        await asyncio.gather(*(http_loop(port, requests[i % len(requests)], perf() + warmup, 10**6, [], {})
                               for i in range(concurrency)))
    lat: list[float] = []
    statuses: dict[int, int] = {}
    meter = CpuMeter(server_pid)
    meter.start()
    t0 = perf()
    await asyncio.gather(*(http_loop(port, requests[i % len(requests)], t0 + duration,
                                     max(1, max_requests // concurrency), lat, statuses)
                           for i in range(concurrency)))
    elapsed = perf() - t0
    return {"requests": len(lat), "req_per_s": round(len(lat) / elapsed, 1), "latency": latency_summary(lat),
            "statuses": {str(k): v for k, v in statuses.items()}, "cpu": meter.stop(), "concurrency": concurrency}


# -- history -----------------------------------------------------------------------
async def history(p: dict[str, Any]) -> dict[str, Any]:
    """Seed one conversation over WS with pipelined sends, then time pages of 50 over HTTP."""
    total, window = p["messages"], p["window"]
    async with make_session() as session:
        api = Kisse(session, p["base"])
        tag = unique("h")
        (ta, _), (_, ub) = await asyncio.gather(api.register(f"{tag}_a"), api.register(f"{tag}_b"))
        conv = await api.conversation(ta, ub)
        ws = await api.connect(ta)
        gate = asyncio.Semaphore(window)
        acked = 0
        errors: list[str] = []
        done = asyncio.Event()

        async def reader() -> None:
            nonlocal acked
            async for msg in ws:
                if msg.data.startswith('{"type":"ack"'):
                    acked += 1
                    gate.release()
                elif msg.data.startswith('{"type":"error"'):
                    errors.append(msg.data[:300])
                    acked += 1
                    gate.release()
                if acked >= total:
                    done.set()

        reader_task = asyncio.ensure_future(reader())
        t0 = perf()
        deadline = t0 + p["seed_timeout"]
        for k in range(total):
            await gate.acquire()
            if perf() > deadline:
                break
            await ws.send_str('{"type":"message.send","id":%d,"data":{"conversation_id":"%s",'
                              '"client_message_id":"h%d","ciphertext":"%s"}}' % (k, conv, k, CIPHERTEXT))
        try:
            await asyncio.wait_for(done.wait(), max(1.0, deadline - perf()))
        except asyncio.TimeoutError:
            pass
        seed_s = perf() - t0
        reader_task.cancel()
        await ws.close()
        seeded = acked - len(errors)
        rng = random.Random(8)
        n = p["requests"]
        latest = [build_get(f"/api/conversations/{conv}/messages?limit=50", ta)]
        deep = [build_get(f"/api/conversations/{conv}/messages?limit=50&before={rng.randint(51, max(52, seeded))}", ta)
                for _ in range(min(n, 1000))]
        port = int(p["base"].rsplit(":", 1)[1])
        latest_r = await http_load(port, latest, 1, p["duration"], 0.3, n, p["server_pid"])
        deep_r = await http_load(port, deep, 1, p["duration"], 0.3, n, p["server_pid"])
        return {"seeded": seeded, "seed_s": round(seed_s, 2), "seed_msgs_per_s": round(seeded / seed_s, 1),
                "seed_errors": errors[:3], "latest_page": latest_r, "random_page": deep_r,
                "rss_after_seed": rss(p["server_pid"])}


# -- REST ----------------------------------------------------------------------------
async def rest(p: dict[str, Any]) -> dict[str, Any]:
    """Authenticated GET /api/conversations (Kisse) or GET /json (bare) at `concurrency` connections."""
    port = int(p["base"].rsplit(":", 1)[1])
    if p["target"] == "kisse":
        async with make_session() as session:
            api = Kisse(session, p["base"])
            tag = unique("q")
            users = await asyncio.gather(*(api.register(f"{tag}_{i}") for i in range(1 + p["conversations"])))
            me = users[0]
            for i, (token, _) in enumerate(users[1:]):
                conv = await api.conversation(token, me[1])
                await api.call("POST", "/api/messages", token, {"conversation_id": conv,
                                                                "client_message_id": f"q{i}",
                                                                "ciphertext": CIPHERTEXT})
        request = build_get("/api/conversations", me[0])
    else:
        request = build_get("/json")
    result = await http_load(port, [request], p["concurrency"], p["duration"], p["warmup"], p["max_requests"],
                             p["server_pid"])
    return {"target": p["target"], **result}


# -- the key directory -----------------------------------------------------------------
class PrekeyMaker:
    """One device's public keys as libsignal serializes and signs them (tests/prekeys.py
    does the same for the tests): Curve25519 keys with their 0x05 type byte, XEdDSA
    signatures carrying the Edwards sign bit in their top bit. The Kyber-1024 keys are
    the 0x08 type byte and 1,568 random bytes: the server checks sizes, type bytes and
    signatures, and cannot tell them from real ones."""

    def __init__(self) -> None:
        import xeddsa  # imported here: only this scenario needs it
        self.xeddsa = xeddsa
        self._private = xeddsa.seed_to_priv(os.urandom(32))
        self._sign_bit = xeddsa.priv_to_ed25519_pub(self._private)[31] & 0x80
        self.identity_key = self._b64(b"\x05" + xeddsa.priv_to_curve25519_pub(self._private))

    @staticmethod
    def _b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    def curve_key(self) -> bytes:
        return b"\x05" + self.xeddsa.priv_to_curve25519_pub(self.xeddsa.seed_to_priv(os.urandom(32)))

    def signed(self, key_id: int, public_key: bytes) -> dict[str, Any]:
        signature = bytearray(self.xeddsa.ed25519_priv_sign(self._private, public_key, os.urandom(64)))
        signature[63] = (signature[63] & 0x7F) | self._sign_bit
        return {"key_id": key_id, "public_key": self._b64(public_key), "signature": self._b64(bytes(signature))}

    def kyber(self, key_id: int) -> dict[str, Any]:
        return self.signed(key_id, b"\x08" + os.urandom(1568))

    def bundle(self, registration_id: int, last_resort_id: int) -> dict[str, Any]:
        """A `PUT /api/keys` body without one-time prekeys."""
        return {"registration_id": registration_id, "identity_key": self.identity_key,
                "signed_prekey": self.signed(1, self.curve_key()), "pq_last_resort_prekey": self.kyber(last_resort_id)}

    def one_time(self, ids: range) -> dict[str, Any]:
        """A `POST /api/keys/prekeys` body: one-time EC and PQ prekeys with these ids."""
        return {"one_time_prekeys": [{"key_id": i, "public_key": self._b64(self.curve_key())} for i in ids],
                "pq_one_time_prekeys": [self.kyber(i) for i in ids]}


def _handed_out(keys: list[dict[str, Any]], uploaded: dict[int, str]) -> dict[str, Any]:
    """One kind's one-time keys as the claims got them, against what was uploaded."""
    ids = [k.get("key_id") for k in keys]
    return {"count": len(ids), "twice": len(ids) - len(set(ids)), "exactly_the_uploaded": set(ids) == set(uploaded),
            "wrong_public_key": sum(uploaded.get(k.get("key_id")) != k.get("public_key") for k in keys)}


async def keys(p: dict[str, Any]) -> dict[str, Any]:
    """Kisse: one device uploads its bundle, then `prekeys` one-time EC and PQ prekeys
    `batch` of each a request; `concurrency` claimers, each in an accepted direct
    conversation with it, claim its bundle (`GET /api/keys/{id}`) in a loop until
    `prekeys + extra_claims` claims are made; every key handed out is checked against
    the uploads. Bare: `GET /json`, the same client, loop and count."""
    n, concurrency = p["prekeys"], p["concurrency"]
    total = n + p["extra_claims"]
    out: dict[str, Any] = {"target": p["target"], "prekeys": n, "concurrency": concurrency}
    async with make_session() as session:
        api = Kisse(session, p["base"])
        tokens: list[str | None] = [None] * concurrency
        path = warm = "/json"
        if p["target"] == "kisse":
            tag = unique("k")
            users = await bounded_gather(16, [lambda i=i: api.register(f"{tag}_{i}") for i in range(1 + concurrency)])
            for u in users:
                if isinstance(u, BaseException):
                    raise u
            owner, claimers = users[0], users[1:]
            convs = await bounded_gather(16, [lambda c=c: api.conversation(c[0], owner[1]) for c in claimers])
            for c in convs:
                if isinstance(c, BaseException):
                    raise c
            # The owner is the second user of every pair: it accepts each claimer's request.
            await accept_requests(api, [u for c in claimers for u in (c, owner)], convs, 16)
            tokens, path, warm = [c[0] for c in claimers], f"/api/keys/{owner[1]}", "/api/keys"
            maker = PrekeyMaker()
            last_resort_id = n + 1
            bundle = maker.bundle(1234, last_resort_id)
            bodies = [maker.one_time(range(k, min(k + p["batch"], n + 1))) for k in range(1, n + 1, p["batch"])]
            uploaded = {kind: {k["key_id"]: k["public_key"] for body in bodies for k in body[kind]}
                        for kind in ("one_time_prekeys", "pq_one_time_prekeys")}
            t0 = perf()
            await api.call("PUT", "/api/keys", owner[0], bundle)
            bundle_s = perf() - t0
            t0 = perf()
            for body in bodies:
                counts = await api.call("POST", "/api/keys/prekeys", owner[0], body)
            upload_s = perf() - t0
            out["upload"] = {"bundle_s": round(bundle_s, 4), "requests": len(bodies), "keys": 2 * n,
                             "seconds": round(upload_s, 3), "keys_per_s": round(2 * n / upload_s, 1),
                             "requests_per_s": round(len(bodies) / upload_s, 1), "counts": counts}

        # Every claimer's keep-alive connection open before the clock starts (Kisse: its own counts).
        warmed = await bounded_gather(concurrency, [lambda t=t: api.call("GET", warm, t) for t in tokens])
        for w in warmed:
            if isinstance(w, BaseException):
                raise w
        lat: list[float] = []
        done_at: list[float] = []
        got: list[Any] = []
        errors: list[str] = []
        started = 0

        async def claimer(i: int) -> None:
            nonlocal started
            while started < total:
                started += 1
                t0 = perf()
                try:
                    data = await api.call("GET", path, tokens[i])
                except Exception as error:  # a failed claim is a figure (it may have taken keys), not a crash
                    errors.append(repr(error)[:300])
                    continue
                done_at.append(perf())
                lat.append(done_at[-1] - t0)
                got.append(data)

        meter = CpuMeter(p["server_pid"])
        meter.start()
        t0 = perf()
        await asyncio.gather(*(claimer(i) for i in range(concurrency)))
        elapsed = perf() - t0
        out.update(requests=len(lat), req_per_s=round(len(lat) / elapsed, 1), latency=latency_summary(lat),
                   cpu=meter.stop(), errors=errors[:5], error_count=len(errors))
        if p["target"] != "kisse":
            return out
        devices = [d for body in got for d in body.get("devices") or ()]
        ec = [d["one_time_prekey"] for d in devices if d.get("one_time_prekey")]
        pq = [d["pq_prekey"] for d in devices if d["pq_prekey"].get("key_id") != last_resort_id]
        fallbacks = [d for d in devices if not d.get("one_time_prekey")]
        out.update(
            claims=len(got), one_device_each=len(devices) == len(got) and all(len(b["devices"]) == 1 for b in got),
            ec=_handed_out(ec, uploaded["one_time_prekeys"]), pq=_handed_out(pq, uploaded["pq_one_time_prekeys"]),
            empty_pool_claims=len(fallbacks), extra_claims=p["extra_claims"],
            empty_pool_got_last_resort=all(d["pq_prekey"] == bundle["pq_last_resort_prekey"] for d in fallbacks),
            counts_after=await api.call("GET", "/api/keys", owner[0]))
        out["handed_out_twice"] = out["ec"]["twice"] + out["pq"]["twice"]
        # Claims/s as the pools drain, by tenths of the claims in the order they completed
        # (the last tenth includes the empty-pool claims).
        tenth = len(done_at) // 10
        if tenth >= 2:
            out["claims_per_s_by_tenth"] = [round((tenth - 1) / (done_at[k + tenth - 1] - done_at[k]), 1)
                                            for k in range(0, 10 * tenth, tenth)]
        return out


# -- restart and soak: the reference client of tests/traffic.py ----------------------------
async def register_tagged_pairs(api: "Kisse", pairs: int, tag: str,
                                accept: bool = False) -> tuple[list[Any], list[Any]]:
    """Like `register_pairs`, with at most 8 registrations at a time (MongoDB storage is slower);
    the conversations accepted by their second user only with `accept` (restart and soak
    leave them as requests: the second user's first send accepts)."""
    tag = unique(tag)
    users = await bounded_gather(8, [lambda i=i: api.register(f"{tag}_{i}") for i in range(2 * pairs)])
    for u in users:
        if isinstance(u, BaseException):
            raise u
    convs = await bounded_gather(8, [lambda i=i: api.conversation(users[2 * i][0], users[2 * i + 1][1])
                                     for i in range(pairs)])
    for c in convs:
        if isinstance(c, BaseException):
            raise c
    if accept:
        await accept_requests(api, users, convs, 8)
    return users, convs


def traffic_clients(base: str, users: list[tuple[str, str]], convs: list[str], window: int, backoff_base: float,
                    backoff_cap: float, mark_delivered: bool = False) -> list[Any]:
    from tests.traffic import TrafficClient
    return [TrafficClient(base, token, user_id=user_id, conversations=[convs[i // 2]], window=window,
                          backoff_base=backoff_base, backoff_cap=backoff_cap, mark_delivered=mark_delivered,
                          name=f"b{i}", seed=i).start()
            for i, (token, user_id) in enumerate(users)]


async def wait_clients(clients: list[Any], condition: Callable[[Any], bool], timeout: float) -> bool:
    deadline = perf() + timeout
    for client in clients:
        if not await client.wait_for(lambda: condition(client), max(0.0, deadline - perf())):
            return False
    return True


async def ledger(api: "Kisse", users: list[tuple[str, str]], convs: list[str], clients: list[Any],
                 others: list[Any] = ()) -> dict[str, int]:  # type: ignore[assignment]
    """tests/traffic.py's `ledger` counts (users 2i and 2i+1 share `convs[i]`)."""
    from tests import traffic
    counts, _ = await traffic.ledger(lambda path, token: api.call("GET", path, token),
                                     [users[2 * i][0] for i in range(len(convs))], convs, clients, others)
    return counts


def _process_gone(pid: int, timeout: float) -> None:
    from benchmarks.procs import alive
    deadline = perf() + timeout
    while alive(pid):
        if perf() > deadline:
            raise RuntimeError(f"server {pid} still alive {timeout:.0f}s after SIGKILL")
        time.sleep(0.005)


async def restart(p: dict[str, Any]) -> dict[str, Any]:
    """`pairs` × 2 clients queue `sends_each` messages each, all in flight at once; once a
    tenth are acked the server is killed (SIGKILL) and started again on the same port
    and database. Time until every send is acked, ack latencies after the restart, and
    storage checked for lost, duplicated, holes and order. With `kill` false: the same
    sends without a crash (the storage's own time: the floor of any recovery)."""
    import signal as signals

    from benchmarks import procs
    from tests.traffic import percentile
    clock = time.monotonic  # the clock of tests/traffic.py's timestamps
    async with make_session() as session:
        api = Kisse(session, p["base"])
        users, convs = await register_tagged_pairs(api, p["pairs"], "rs")
        clients = traffic_clients(p["base"], users, convs, p["sends_each"], p["backoff_base"], p["backoff_cap"])
        replacement = None
        try:
            if not await wait_clients(clients, lambda c: c.synced, 60):
                raise RuntimeError("clients did not connect")
            total = len(clients) * p["sends_each"]
            t_queue = clock()
            for i, client in enumerate(clients):
                for _ in range(p["sends_each"]):
                    client.send(convs[i // 2], ciphertext=CIPHERTEXT)
            out: dict[str, Any] = {"clients": len(clients), "sends": total, "killed": bool(p["kill"])}
            if p["kill"]:
                while sum(1 for c in clients for s in c.sends if s.acked_at) < total // 10:
                    if clock() - t_queue > p["timeout"]:
                        raise RuntimeError("traffic did not start")
                    await asyncio.sleep(0.002)
                t_kill = clock()
                out["acked_before_kill"] = sum(1 for c in clients for s in c.sends if s.acked_at)
                os.kill(p["server_pid"], signals.SIGKILL)
                await asyncio.get_running_loop().run_in_executor(None, _process_gone, p["server_pid"], 30)
                replacement = procs.spawn(p["respawn"])
                with open(p["pid_file"], "w") as f:
                    f.write(str(replacement.pid))
                await asyncio.get_running_loop().run_in_executor(
                    None, procs.wait_listening, p["respawn"]["port"], 60)
                t_listen = clock()
                out["downtime_s"] = round(t_listen - t_kill, 3)
            all_acked = await wait_clients(clients, lambda c: not c.unacked(), p["timeout"])
            t_done = clock()
            sends = [s for c in clients for s in c.sends]
            out.update(all_acked=all_acked, unacked=sum(1 for s in sends if s.acked_at is None),
                       total_s=round(t_done - t_queue, 3))
            if p["kill"]:
                later = [s for s in sends if s.acked_at is not None and s.acked_at > t_kill]
                since_listen = [s.acked_at - t_listen for s in later]
                latency = [s.acked_at - max(s.last_sent_at or t_listen, t_listen) for s in later]
                synced = await wait_clients(clients, lambda c: c.synced and c.syncs[-1] > t_listen, 30)
                out.update(acked_after_restart=len(later),
                           all_acked_after_listen_s=_r(max(since_listen) if since_listen else None),
                           recovery={"p50_s": _r(percentile(since_listen, 50)), "p99_s": _r(percentile(since_listen, 99))},
                           ack_latency=latency_summary(latency), all_synced=synced,
                           all_synced_after_listen_s=_r(max(min((t for t in c.syncs if t > t_listen), default=inf)
                                                            for c in clients) - t_listen))
            else:
                latency = [s.acked_at - s.first_sent_at for s in sends if s.acked_at and s.first_sent_at]
                out["ack_latency"] = latency_summary(latency)
            out["ledger"] = await ledger(api, users, convs, clients)
            out["client_errors"] = dict(sum((c.error_codes for c in clients), Counter()))
            out["reconnects"] = sum(len(c.connects) - 1 for c in clients)
            return out
        finally:
            for client in clients:
                await client.stop()
            if replacement is not None:
                replacement.send_signal(signals.SIGTERM)
                try:
                    await asyncio.get_running_loop().run_in_executor(None, replacement.wait, 15)
                except Exception:
                    replacement.kill()


def _slope_per_minute(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, bytes) samples, in bytes per minute."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt, mr = sum(t for t, _ in samples) / n, sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (r - mr) for t, r in samples) / var if var else None


async def soak(p: dict[str, Any]) -> dict[str, Any]:
    """Mixed traffic for `duration` seconds on MongoDB storage (so what is stored is
    not in the server's RSS): `pairs` × 2 devices that send (with typing first), mark
    what they get delivered, set their presence, and are cut off now and then (they
    reconnect and sync); short-lived second devices that connect, sync, send and leave,
    politely or not; REST reads (conversations, history pages, capabilities). The
    server's VmRSS every `sample_every` s; the slope after `warmup` s is the figure."""
    from tests.traffic import TrafficClient
    rng = random.Random(5)
    pid = p["server_pid"]
    async with make_session() as session:
        api = Kisse(session, p["base"])
        users, convs = await register_tagged_pairs(api, p["pairs"], "sk")
        clients = traffic_clients(p["base"], users, convs, 20, 0.2, 2.0, mark_delivered=True)
        visitors: list[Any] = []
        gone: list[Any] = []  # visitors that left, for the ledger
        counts = {"cuts": 0, "visits": 0, "rest": 0, "rest_errors": 0, "typing": 0, "presence": 0}
        stop = asyncio.Event()
        try:
            if not await wait_clients(clients, lambda c: c.synced, 60):
                raise RuntimeError("clients did not connect")
            t0 = perf()

            async def every(interval: float, action: Callable[[], Awaitable[None]]) -> None:
                await asyncio.sleep(rng.uniform(0, interval))
                while not stop.is_set():
                    await action()
                    await asyncio.sleep(interval * rng.uniform(0.5, 1.5))

            async def send() -> None:
                i = rng.randrange(len(clients))
                if clients[i].request("typing.start", {"conversation_id": convs[i // 2]}):
                    counts["typing"] += 1
                clients[i].send(convs[i // 2], ciphertext=CIPHERTEXT)

            async def cut() -> None:
                rng.choice(clients).cut()
                counts["cuts"] += 1

            async def presence() -> None:
                if rng.choice(clients).request("presence.set", {"status": rng.choice(["online", "away", "busy"])}):
                    counts["presence"] += 1

            async def visit() -> None:
                i = rng.randrange(len(users))
                visitor = TrafficClient(p["base"], users[i][0], user_id=users[i][1], conversations=[convs[i // 2]],
                                        backoff_base=0.2, backoff_cap=2.0, name=f"v{counts['visits']}").start()
                visitors.append(visitor)
                counts["visits"] += 1
                await visitor.wait_for(lambda: visitor.synced, 10)
                visitor.send(convs[i // 2], ciphertext=CIPHERTEXT)
                await visitor.wait_for(lambda: not visitor.unacked(), 10)
                if rng.random() < 0.5:
                    visitor.cut()
                await visitor.stop()
                visitors.remove(visitor)
                gone.append(visitor)

            async def rest() -> None:
                i = rng.randrange(len(users))
                token = users[i][0]
                paths = ["/api/conversations", f"/api/conversations/{convs[i // 2]}/messages?limit=50",
                         "/api/capabilities", f"/api/presence/{users[i ^ 1][1]}"]
                try:
                    await api.call("GET", rng.choice(paths), token)
                    counts["rest"] += 1
                except Exception:
                    counts["rest_errors"] += 1

            samples: list[tuple[float, int]] = []

            async def sample() -> None:
                samples.append((round(perf() - t0, 2), rss(pid)))

            loops = [asyncio.ensure_future(every(p["send_every"], send)),
                     asyncio.ensure_future(every(p["cut_every"], cut)),
                     asyncio.ensure_future(every(p["visit_every"], visit)),
                     asyncio.ensure_future(every(p["rest_every"], rest)),
                     asyncio.ensure_future(every(p["presence_every"], presence))]
            meter = CpuMeter(pid)
            meter.start()
            while perf() - t0 < p["duration"]:
                await sample()
                await asyncio.sleep(max(0.0, p["sample_every"] - (perf() - t0) % p["sample_every"]))
            await sample()
            cpu = meter.stop()
            stop.set()
            for loop in loops:
                loop.cancel()
            all_acked = await wait_clients(clients, lambda c: not c.unacked(), 60)
            for visitor in list(visitors):
                await visitor.stop()
                gone.append(visitor)
            await asyncio.sleep(1)
            metrics = await (await session.get(p["base"] + "/metrics")).text()
            counted = next((float(line.split()[1]) for line in metrics.splitlines()
                            if line.startswith("kisse_ws_connections ")), None)
            open_now = sum(1 for c in clients if c.connected)
            steady = [(t, r) for t, r in samples if t >= p["warmup"]]
            slope = _slope_per_minute(steady)
            book = await ledger(api, users, convs, clients, gone)
            return {"duration_s": p["duration"], "sample_every_s": p["sample_every"], "warmup_s": p["warmup"],
                    "rss_samples": samples, "rss_first": steady[0][1] if steady else None,
                    "rss_last": steady[-1][1] if steady else None,
                    "rss_slope_bytes_per_min": None if slope is None else round(slope),
                    "rss_growth_beyond_warmup": steady[-1][1] - steady[0][1] if steady else None,
                    "sends": sum(len(c.sends) for c in [*clients, *gone]), "all_acked": all_acked, "ledger": book,
                    "visitor_sends_unacked": sum(len(v.unacked()) for v in gone),
                    "ws_connections_counted": counted, "ws_connections_open": open_now, "counts": counts,
                    "reconnects": sum(len(c.connects) - 1 for c in clients),
                    "client_errors": dict(sum((c.error_codes for c in clients), Counter())), "cpu": cpu}
        finally:
            stop.set()
            for client in [*clients, *visitors]:
                await client.stop()


# -- cluster: several Kisse nodes on one MongoDB and one Redis (KISSE_BUS) -----------------
class ProcessesMeter:
    """CPU of named processes, and of this load generator, over a window, in % of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> None:
        self.t0, self.c0 = perf(), own_cpu_seconds()
        self.s0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, Any]:
        wall = perf() - self.t0
        cpu = {name: round(100 * (cpu_seconds(pid) - self.s0[name]) / wall, 1) for name, pid in self.pids.items()}
        cpu["load generator"] = round(100 * (own_cpu_seconds() - self.c0) / wall, 1)
        return {"wall_s": round(wall, 3), "cpu_pct": cpu, "total_cpu_pct": round(sum(cpu.values()), 1)}


BUS_COUNTERS = ("published", "received", "undelivered", "operations")


async def bus_stats(session: aiohttp.ClientSession, bases: list[str]) -> list[dict[str, Any]]:
    """Each node's bus counters (`bus` of GET /readyz: cumulative since the node started)."""
    async def one(base: str) -> dict[str, Any]:
        async with session.get(base + "/readyz") as response:
            return (await response.json(content_type=None))["bus"]
    return list(await asyncio.gather(*(one(b) for b in bases)))


async def cluster_phase(session: aiohttp.ClientSession, p: dict[str, Any], urls: list[tuple[str, str, str]],
                        bases: list[str], pids: dict[str, int]) -> dict[str, Any]:
    """The relay's closed loop (picows, `window` in flight per pair) over sockets spread on
    the nodes as `urls` says. Throughput, latency and CPU over the measured window; bus
    counters from every node before the first send and after the last delivery."""
    from benchmarks import fastws
    sides = list(await bounded_gather(16, [lambda u=u: fastws.connect(u, True) for pair in urls for u in pair[:2]]))
    for side in sides:
        if isinstance(side, BaseException):
            raise side
    deliveries: list[tuple[float, float]] = []
    per_pair = max(1, p["max_messages"] // len(urls))
    pairs = [fastws.Pair(i, sides[2 * i], sides[2 * i + 1], c, CIPHERTEXT, True, p["window"], per_pair, deliveries)
             for i, (_, _, c) in enumerate(urls)]
    try:
        await asyncio.sleep(p["settle"])  # every node has announced its users in the directory
        before = await bus_stats(session, bases)
        for pair in pairs:
            pair.start()
        await asyncio.sleep(p["warmup"])
        meter = ProcessesMeter(pids)
        meter.start()
        t_start = perf()
        done_at = t_start + p["duration"]
        while perf() < done_at and any(pair.next < pair.max_messages for pair in pairs):
            await asyncio.sleep(0.05)
        t_end = perf()
        cpu = meter.stop()
        for pair in pairs:
            pair.stopped = True
        drained = await _drained(pairs, sides[::2], p["drain_timeout"])  # the last messages and receipts
        after = await bus_stats(session, bases)
    finally:
        for side in sides:
            if side.transport is not None:
                side.transport.send_close()
                side.transport.disconnect()
    window_lat = [lat for (t, lat) in deliveries if t_start <= t <= t_end]
    relayed = sum(pair.received for pair in pairs)
    per_node = [{k: _num_delta(b.get(k), a.get(k)) for k in BUS_COUNTERS} for b, a in zip(before, after)]
    bus = {k: sum(n[k] for n in per_node) for k in BUS_COUNTERS}
    receipts = sum(side.receipts for side in sides[::2])
    # A receipt covers every message up to its seq (two `message.delivered` that cross
    # in storage make one receipt), so what counts is how far each A's last one reaches.
    unreceipted = sum(max(0, pair.last_seq - _receipt_seq(pair.a.last_receipt)) for pair in pairs)
    errors = [e for side in sides for e in side.errors]
    return {"measured_s": round(t_end - t_start, 3), "delivered": len(window_lat),
            "msgs_per_s": round(len(window_lat) / (t_end - t_start), 1), "latency": latency_summary(window_lat),
            "cpu": cpu, "relayed": relayed, "receipts": receipts, "unreceipted": unreceipted, "drained": drained,
            "bus": bus,
            "bus_per_node": per_node,
            "operations_per_message": round(bus["operations"] / relayed, 3) if relayed else None,
            "published_per_message": round(bus["published"] / relayed, 3) if relayed else None,
            "nodes_alive": [a.get("nodes_alive") for a in after], "bus_state": [a.get("state") for a in after],
            "errors": errors[:5], "error_count": len(errors)}


def _receipt_seq(frame: str | None) -> int:
    return int(json.loads(frame)["data"].get("delivered_seq") or 0) if frame else 0


async def _drained(pairs: list[Any], senders: list[Any], timeout: float) -> bool:
    """Wait until every message sent was received and the receipts stopped coming."""
    deadline = perf() + timeout
    last, quiet_since = -1, perf()
    while perf() < deadline:
        receipts = sum(side.receipts for side in senders)
        if receipts != last:
            last, quiet_since = receipts, perf()
        if all(pair.received >= pair.next and _receipt_seq(pair.a.last_receipt) >= pair.last_seq
               for pair in pairs) and perf() - quiet_since >= 0.3:
            return True
        await asyncio.sleep(0.05)
    return False


def _num_delta(before: Any, after: Any) -> int:
    return int(after or 0) - int(before or 0)


async def cluster(p: dict[str, Any]) -> dict[str, Any]:
    """Relay pairs on the nodes of one cluster, once per phase (name, placement, pairs,
    window), each phase with fresh users (registered through node 0; conversations
    accepted, so receipts flow): placement `same` puts both ends of pair i on node
    i % n, `cross` puts A on node i % n and B on node (i + 1) % n. Every node carries
    the same share of sockets either way."""
    nodes = p["nodes"]
    n = len(nodes)
    bases = [node["base"] for node in nodes]
    pids = {f"kisse node {k}": node["pid"] for k, node in enumerate(nodes)}
    pids.update(p.get("pids") or {})
    out: dict[str, Any] = {"nodes": n, "phases": {}}
    async with make_session() as session:
        api = Kisse(session, bases[0])
        for name, where, pairs, window in p["phases"]:
            t0 = perf()
            users, convs = await register_tagged_pairs(api, pairs, f"c{where[0]}", accept=True)
            setup_s = perf() - t0
            shift = 1 if where == "cross" and n > 1 else 0
            placement = [(i % n, (i + shift) % n) for i in range(pairs)]
            ws = [b.replace("http://", "ws://") for b in bases]
            urls = [(f"{ws[a]}/ws?token={users[2 * i][0]}", f"{ws[b]}/ws?token={users[2 * i + 1][0]}", convs[i])
                    for i, (a, b) in enumerate(placement)]
            result = await cluster_phase(session, {**p, "window": window}, urls, bases, pids)
            result.update(placement=where, pairs=pairs, window=window, setup_s=round(setup_s, 2))
            result["sockets_per_node"] = [sum((a == k) + (b == k) for a, b in placement) for k in range(n)]
            result["cross_node_pairs"] = sum(a != b for a, b in placement)
            out["phases"][name] = result
            await asyncio.sleep(p["settle"])  # the sockets are gone everywhere before the next phase
    return out


# -- push wake-ups (issue 19): recipients offline, a fake Web Push service in this process --
PUSH_METRICS = ("kisse_pushes_total", "kisse_push_queue", "kisse_push_dropped_wakeups",
                "kisse_push_dropped_registrations", "kisse_push_request_duration_seconds_sum",
                "kisse_push_request_duration_seconds_count")


async def push_metrics(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The server's push figures from /metrics, e.g. `kisse_pushes_total{kind="wake",outcome="sent",...}`."""
    async with session.get(base + "/metrics") as response:
        text = await response.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(PUSH_METRICS):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def pushes_sent(metrics: dict[str, float]) -> dict[str, float]:
    """`kisse_pushes_total` by outcome (every provider and kind summed)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if name.startswith("kisse_pushes_total{"):
            outcome = name.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0) + value
    return out


async def push_features(api: "Kisse") -> list[str]:
    return (await api.call("GET", "/api/capabilities"))["features"].get("push") or []


async def register_push(api: "Kisse", fake: Any, tokens: list[str], concurrency: int = 16) -> list[dict[str, Any]]:
    """A subscription of the fake for each token's device, registered with `PUT /api/push`."""
    subs = [fake.subscribe() for _ in tokens]
    done = await bounded_gather(concurrency, [
        lambda t=t, s=s: api.call("PUT", "/api/push", t, {"provider": "webpush", **s}, expect=(204,))
        for t, s in zip(tokens, subs)])
    for d in done:
        if isinstance(d, BaseException):
            raise d
    return subs


def _machine_jiffies() -> tuple[int, int]:
    """(all, busy) CPU jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), sum(values) - values[3] - values[4]  # idle and iowait are not busy


def _others_cpu(before: tuple[int, int], cpu: dict[str, float]) -> float:
    """% of one core the rest of the machine used since `before`: busy, less this process and the server."""
    total, busy = _machine_jiffies()
    machine = 100 * (os.cpu_count() or 1) * (busy - before[1]) / max(total - before[0], 1)
    return round(max(0.0, machine - cpu["client_cpu_pct"] - cpu["server_cpu_pct"]), 1)


def _wakes_by_endpoint(fake: Any, start: int = 0) -> dict[str, list[Any]]:
    """The pushes the fake accepted (2xx; from its `start`-th), by subscription endpoint, in arrival order."""
    out: dict[str, list[Any]] = {}
    for push in fake.pushes[start:]:
        if 200 <= push.status < 300 and not push.abandoned:
            out.setdefault(push.endpoint, []).append(push)
    return out


class AckSender:
    """One sender's closed loop over picows: at most `window` `message.send` unacknowledged;
    each `ack` (or `error`) frees a slot and the next send goes out."""

    def __init__(self, side: Any, index: int, conversation_id: str, window: int, max_messages: int,
                 acks: list[tuple[float, float]], errors: list[str]) -> None:
        from picows import WSMsgType  # here: only the picows loads need it
        self.text = WSMsgType.TEXT
        self.side, self.window, self.max_messages = side, window, max_messages
        self.template = ('{"type":"message.send","id":%%d,"data":{"conversation_id":"%s",'
                         '"client_message_id":"s%d-%%d","ciphertext":"%s"}}' % (conversation_id, index, CIPHERTEXT))
        self.sent_at: dict[int, float] = {}
        self.next = 0
        self.acked = 0
        self.stopped = False
        self.acks, self.errors = acks, errors
        side.on_text = self.on_text

    def start(self) -> None:
        for _ in range(self.window):
            self.send()

    def send(self) -> None:
        if self.stopped or self.next >= self.max_messages or self.side.transport is None:
            return
        k = self.next
        self.next += 1
        self.sent_at[k] = perf()
        self.side.transport.send(self.text, (self.template % (k, k)).encode())

    def on_text(self, text: str) -> None:
        ack = text.startswith('{"type":"ack"')
        if not ack and not text.startswith('{"type":"error"'):
            return  # an event (none expected: the other side never connects)
        t0 = self.sent_at.pop(json.loads(text).get("id"), None)
        if t0 is None:
            return
        if ack:
            now = perf()
            self.acks.append((now, now - t0))
            self.acked += 1
        else:
            self.errors.append(text[:300])
        self.send()


async def push_relay(p: dict[str, Any]) -> dict[str, Any]:
    """`pairs` senders, each in an accepted direct conversation with its own recipient who
    never connects; each sender keeps `window` sends unacknowledged (closed loop on the
    acks, picows). With `push`, every recipient's device has a Web Push subscription of a
    fake push service in this process (tests/fake_webpush.py: it checks VAPID, decrypts
    and records), so every message plans a wake-up for an offline device. Acked sends/s
    over `duration` after `warmup`; the pushes the fake received and the server counted."""
    from benchmarks import fastws
    from tests.fake_webpush import FakeWebPush
    pairs, window = p["pairs"], p["window"]
    ws_base = p["base"].replace("http://", "ws://")
    fake = FakeWebPush()
    await fake.start()
    sides: list[Any] = []
    try:
        async with make_session() as session:
            api = Kisse(session, p["base"])
            features = await push_features(api)
            if features != (["webpush"] if p["push"] else []):
                raise RuntimeError(f"push {'on' if p['push'] else 'off'} wanted, the server pushes through {features}")
            t0 = perf()
            users, convs = await register_pairs(api, pairs)
            register = p.get("register", p["push"])  # False with push on: a cross-check, no device to wake
            subs = await register_push(api, fake, [users[2 * i + 1][0] for i in range(pairs)]) if register else []
            setup_s = perf() - t0
            for i in range(pairs):
                sides.append(await fastws.connect(f"{ws_base}/ws?token={users[2 * i][0]}", True))
            acks: list[tuple[float, float]] = []
            errors: list[str] = []
            senders = [AckSender(side, i, convs[i], window, max(1, p["max_messages"] // pairs), acks, errors)
                       for i, side in enumerate(sides)]
            t_first = perf()
            for sender in senders:
                sender.start()
            await asyncio.sleep(p["warmup"])
            # And until every subscribed device has had its first wake-up: the next one is due at
            # the end of its coalescing window (30 s), so the window measures the steady state,
            # not the one-off burst of first wake-ups (a 6 s window holding them would count
            # them five times over).
            endpoints = {s["endpoint"] for s in subs}
            deadline = perf() + p.get("wake_timeout", 30)
            while not endpoints <= _wakes_by_endpoint(fake).keys() and perf() < deadline:
                await asyncio.sleep(0.02)
            first_wakes = _wakes_by_endpoint(fake)
            meter = CpuMeter(p["server_pid"])
            meter.start()
            machine = _machine_jiffies()
            t_start = perf()
            done_at = t_start + p["duration"]
            while perf() < done_at and any(s.next < s.max_messages for s in senders):
                await asyncio.sleep(0.05)
            t_end = perf()
            cpu = meter.stop()
            cpu["others_cpu_pct"] = _others_cpu(machine, cpu)  # anything else running takes the server's cores
            for sender in senders:
                sender.stopped = True
            await asyncio.sleep(0.5)  # the last acks, and the wake-ups of the last plans
            metrics = await push_metrics(session, p["base"])
        window_lat = [lat for (t, lat) in acks if t_start <= t <= t_end]
        woken = _wakes_by_endpoint(fake)
        per_device = [len(woken.get(s["endpoint"], ())) for s in subs]
        # The fake's stamps are time.monotonic(), ours perf_counter(): both CLOCK_MONOTONIC on Linux.
        firsts = [pushes[0].at for pushes in first_wakes.values()]
        in_window = sum(1 for pushes in woken.values() for x in pushes if t_start <= x.at <= t_end)
        return {"push": p["push"], "features_push": features, "pairs": pairs, "window": window,
                "setup_s": round(setup_s, 2), "measured_s": round(t_end - t_start, 3), "acked": len(window_lat),
                "sends_per_s": round(len(window_lat) / (t_end - t_start), 1),
                "sent_total": sum(s.next for s in senders), "acked_total": sum(s.acked for s in senders),
                "latency": latency_summary(window_lat), "cpu": cpu, "errors": errors[:5], "error_count": len(errors),
                "recipients": pairs, "registered": len(subs), "devices_woken": sum(1 for n in per_device if n),
                "first_wakeups_done_s": _r(max(firsts) - t_first) if firsts else None,
                "measured_from_s": round(t_start - t_first, 3), "wakeups_in_window": in_window,
                "wakeups_received": sum(per_device), "max_wakeups_per_device": max(per_device, default=0),
                "fake_requests": len(fake.pushes), "fake_errors": fake.errors[:5],
                "fake_error_count": len(fake.errors), "pushes_sent": pushes_sent(metrics), "metrics": metrics}
    finally:
        for side in sides:
            if side.transport is not None:
                side.transport.send_close()
                side.transport.disconnect()
        await fake.stop()


async def push_burst(p: dict[str, Any]) -> dict[str, Any]:
    """`devices` users, each signed in on one device with a Web Push subscription of the
    fake (tests/fake_webpush.py), none connected, all members (accepted) of one group
    with a sender, who connects. The fake holds each push `answer_delay` seconds before
    its 201 (0, or a remote push service's answer time). The sender pipelines `messages`
    sends to the group at once: every device should get exactly one wake-up (coalescing).
    From the first send (monotonic clock, as the fake stamps what arrives): when each
    device's wake-up reached the fake; `settle` seconds after the last, how many each got."""
    from tests.fake_webpush import FakeWebPush
    n, burst, hold = p["devices"], p["messages"], p["answer_delay"]
    clock = time.monotonic  # tests/fake_webpush.py's Push.at
    fake = FakeWebPush()
    await fake.start()
    try:
        async with make_session() as session:
            api = Kisse(session, p["base"])
            features = await push_features(api)
            if features != ["webpush"]:
                raise RuntimeError(f"push wanted, the server pushes through {features}")
            tag = unique("w")
            t0 = perf()
            users = await bounded_gather(16, [lambda i=i: api.register(f"{tag}_{i}") for i in range(n + 1)])
            for u in users:
                if isinstance(u, BaseException):
                    raise u
            sender, members = users[0], users[1:]
            phases = {"register_s": perf() - t0}
            subs = await register_push(api, fake, [m[0] for m in members])
            phases["push_register_s"] = perf() - t0 - sum(phases.values())
            group = (await api.call("POST", "/api/conversations", sender[0],
                                    {"participant_ids": [m[1] for m in members], "title": "burst"}))["conversation"]
            phases["group_s"] = perf() - t0 - sum(phases.values())
            accepted = await bounded_gather(16, [
                lambda m=m: api.call("POST", f"/api/conversations/{group['id']}/accept", m[0], {}) for m in members])
            for a in accepted:
                if isinstance(a, BaseException):
                    raise a
            phases["accept_s"] = perf() - t0 - sum(phases.values())
            setup_s = perf() - t0
            if hold:
                for sub in subs:
                    fake.hang(sub, hold)
            ws = await api.connect(sender[0])
            acked_at: dict[int, float] = {}
            errors: list[str] = []

            async def reader() -> None:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        return
                    if msg.data.startswith('{"type":"ack"'):
                        acked_at[json.loads(msg.data)["id"]] = clock()
                    elif msg.data.startswith('{"type":"error"'):
                        errors.append(msg.data[:300])

            reading = asyncio.ensure_future(reader())
            await asyncio.sleep(p["settle"])
            before = len(fake.pushes)  # nothing so far: requests and joins wake nobody
            metrics_before = await push_metrics(session, p["base"])
            endpoints = {s["endpoint"] for s in subs}
            meter = CpuMeter(p["server_pid"])
            meter.start()
            t_send = clock()
            for k in range(burst):
                await ws.send_str('{"type":"message.send","id":%d,"data":{"conversation_id":"%s",'
                                  '"client_message_id":"w%d","ciphertext":"%s"}}' % (k, group["id"], k, CIPHERTEXT))
            deadline = t_send + p["timeout"]
            while clock() < deadline:
                if endpoints <= _wakes_by_endpoint(fake, before).keys():
                    break
                await asyncio.sleep(0.01)
            t_all = clock()
            cpu = meter.stop()
            await asyncio.sleep(p["settle"])  # any second wake-up would come now
            reading.cancel()
            await ws.close()
            woken = _wakes_by_endpoint(fake, before)
            metrics = await push_metrics(session, p["base"])
        first = {e: pushes[0].at - t_send for e, pushes in woken.items() if e in endpoints}
        delays = sorted(first.values())
        counts = [len(woken.get(e, ())) for e in endpoints]
        all_woken = len(first) == n
        sent, sent_before = pushes_sent(metrics), pushes_sent(metrics_before)
        return {"devices": n, "messages": burst, "answer_delay_ms": round(1000 * hold, 1),
                "workers": p.get("workers"), "setup_s": round(setup_s, 2),
                "setup_phases_s": {k: round(v, 2) for k, v in phases.items()},
                "group_members": len(group.get("participants") or ()) or None, "pushes_before_burst": before,
                "acked": len(acked_at), "errors": errors[:5], "error_count": len(errors),
                "all_acked_s": _r(max(acked_at.values()) - t_send) if len(acked_at) == burst else None,
                "all_woken": all_woken, "devices_woken": len(first),
                "time_to_all_s": _r(delays[-1]) if all_woken else None,
                "first_wake_s": _r(delays[0]) if delays else None, "delay": latency_summary(delays),
                "wakeups_per_s": round(n / delays[-1], 1) if all_woken else None,
                "waited_s": round(t_all - t_send, 3), "cpu": cpu,
                "woken_exactly_once": sum(1 for c in counts if c == 1),
                "woken_more_than_once": sum(1 for c in counts if c > 1), "wakeups_received": sum(counts),
                "payloads": dict(Counter(json.dumps(x.json(), sort_keys=True) for v in woken.values() for x in v)),
                "urgency": dict(Counter(x.headers.get("Urgency") for v in woken.values() for x in v)),
                "fake_requests": len(fake.pushes) - before, "fake_error_count": len(fake.errors),
                "fake_errors": fake.errors[:5],
                "pushes_sent": {k: v - sent_before.get(k, 0) for k, v in sent.items()},
                "dropped_wakeups": metrics.get("kisse_push_dropped_wakeups", 0)
                - metrics_before.get("kisse_push_dropped_wakeups", 0),
                "metrics": metrics}
    finally:
        await fake.stop()


SCENARIOS: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "relay": relay, "idle": idle, "login_storm": login_storm, "blob": blob, "history": history, "rest": rest,
    "restart": restart, "soak": soak, "cluster": cluster, "keys": keys,
    "push_relay": push_relay, "push_burst": push_burst,
}


def main() -> None:
    raise_nofile()
    scenario, params_path, result_path = sys.argv[1:4]
    with open(params_path) as f:
        params = json.load(f)
    assert params["base"].startswith(f"http://{HOST}:"), "benchmarks only target 127.0.0.1"
    result = asyncio.run(SCENARIOS[scenario](params))
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
