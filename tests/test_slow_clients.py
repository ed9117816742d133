"""Slow clients and descriptor exhaustion against a real `python -m kisse`
(kisse/listener.py): tricklers are cut on time and their descriptors freed;
near its descriptor limit the server refuses new connections with a warning a
second, keeps serving the connections it has, and recovers."""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import resource
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from unittest import mock

import pytest
import tornado.netutil
import tornado.web

from kisse.listener import Descriptors, GuardedHTTPServer
from tests import served
from tests.served import KisseProcess

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")

HEADER, IDLE, BODY, RATE = 1.0, 2.0, 3.5, 1000
SLACK = 4.0  # a slow CI machine may notice a cut late, never early
FD_LIMIT, FD_RESERVE = 256, 32


def log_text(log: tempfile._TemporaryFileWrapper) -> str:
    log.flush()
    with open(log.name) as f:
        return f.read()


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def slow() -> Iterator[tuple[KisseProcess, tempfile._TemporaryFileWrapper]]:
    log = tempfile.NamedTemporaryFile("w+", prefix="kisse-slow-", suffix=".log")
    env = {"KISSE_HEADER_TIMEOUT": str(HEADER), "KISSE_IDLE_TIMEOUT": str(IDLE),
           "KISSE_BODY_TIMEOUT": str(BODY), "KISSE_BODY_MIN_RATE": str(RATE)}
    with KisseProcess(env, stderr=log.fileno()) as process:
        yield process, log
    text = log_text(log)
    assert "Traceback" not in text and '"level": "ERROR"' not in text, text[-3000:]


class Client(threading.Thread):
    """Sends `first`, then `drip` every `every` seconds (`total` bytes of it at most);
    `lifetime` is how long the server kept the connection open, `answer` what it said."""

    def __init__(self, port: int, first: bytes, drip: bytes = b"", every: float = 0.1, total: int = 10**9,
                 cap: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.port, self.first, self.drip, self.every, self.total, self.cap = port, first, drip, every, total, cap
        self.lifetime: float | None = None
        self.answer = b""
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.sock.settimeout(0.02)

    def run(self) -> None:
        started, sent = time.monotonic(), 0
        self.sock.sendall(self.first)
        while time.monotonic() - started < self.cap:
            try:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.answer += data
            except socket.timeout:
                pass
            except OSError:
                break
            if self.drip and sent < self.total and time.monotonic() - started >= self.every * (sent // len(self.drip) + 1):
                try:
                    self.sock.sendall(self.drip)
                except OSError:
                    break
                sent += len(self.drip)
        else:
            return
        self.lifetime = time.monotonic() - started


def test_slow_clients_are_cut_on_time_and_steady_ones_are_not(slow):
    process, log = slow
    baseline = open_descriptors(process.pid)
    login = b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    upload = json.dumps({"username": "nobody", "password": "p" * 11_940}).encode()
    assert len(upload) > 3 * RATE * BODY / 1.2  # longer, at 3x the minimum rate, than the grace alone allows
    clients = {
        "silent": (Client(process.port, b""), HEADER),
        "header trickle": (Client(process.port, b"GET /healthz HTTP/1.1\r\n", b"X"), HEADER),
        "websocket upgrade trickle": (Client(process.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n", b"X"),
                                      HEADER),
        # An upgrade's body (odd, but possible) gets the header timeout, not the body's.
        "websocket upgrade body": (Client(process.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                                        b"Content-Length: 1000\r\n\r\n", b"X"), HEADER),
        # Keep-alive: the next request's headers are due IDLE after the answer, trickled or not.
        "idle keep-alive": (Client(process.port, healthz), IDLE),
        "keep-alive header trickle": (Client(process.port, healthz, b"X", every=0.3), IDLE),
        "body trickle": (Client(process.port, login + b"Content-Length: 1000\r\n\r\n", b"{"), BODY),
    }
    steady = Client(process.port, login + f"Content-Length: {len(upload)}\r\n\r\n".encode(),
                    b"", cap=30.0)
    for client, _ in clients.values():
        client.start()

    # A steady upload at 3x KISSE_BODY_MIN_RATE outlives KISSE_BODY_TIMEOUT: not cut.
    steady.sock.sendall(steady.first)
    began = time.monotonic()
    for offset in range(0, len(upload), 300):
        time.sleep(max(0.0, began + offset / (3 * RATE) - time.monotonic()))
        steady.sock.sendall(upload[offset:offset + 300])
    assert time.monotonic() - began > BODY
    steady.sock.settimeout(10)
    answer = steady.sock.recv(1000)  # the whole body was read, then judged (its password is too long)
    assert answer.startswith(b"HTTP/1.1 400") and b"application/json" in answer, answer

    for client, _ in clients.values():
        client.join(30)
    for name, (client, timeout) in clients.items():
        assert client.lifetime is not None, f"{name}: still open after {client.cap} s"
        assert timeout * 0.9 <= client.lifetime <= timeout + SLACK, (name, client.lifetime)
        if name == "websocket upgrade body":
            assert client.lifetime < BODY - 0.5, "the upgrade's body got the body timeout"
        if name.startswith(("idle", "keep-alive")):
            assert client.answer.startswith(b"HTTP/1.1 200"), name
        else:
            assert client.answer == b"", (name, client.answer)  # cut, not answered
    # The server closed its side of each: its descriptors are back, ours still open.
    deadline = time.monotonic() + 10
    while open_descriptors(process.pid) > baseline + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_descriptors(process.pid) <= baseline + 1
    for client, _ in clients.values():
        client.sock.close()
    steady.sock.close()


# `python -m kisse`, with RLIMIT_NOFILE lowered first (no preexec_fn: it is unsafe with threads).
LIMITED_KISSE = ("import resource, runpy; "
                 f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
                 "runpy.run_module('kisse', run_name='__main__', alter_sys=True)")


class LimitedKisse(KisseProcess):
    """A server started with RLIMIT_NOFILE at `FD_LIMIT` (soft and hard)."""

    def start(self) -> "LimitedKisse":
        popen = subprocess.Popen

        def limited(args, **kwargs):
            assert list(args[1:]) == ["-m", "kisse"], args
            return popen([args[0], "-c", LIMITED_KISSE], **kwargs)
        with mock.patch.object(served.subprocess, "Popen", limited):
            super().start()
        with open(f"/proc/{self.pid}/limits") as limits:
            assert any(line.startswith("Max open files") and f" {FD_LIMIT} " in line for line in limits)
        return self


def get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response.status


def test_near_the_descriptor_limit_new_connections_are_refused_quietly():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * FD_LIMIT:
        pytest.skip("the test needs more descriptors than the server has")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log = tempfile.NamedTemporaryFile("w+", prefix="kisse-fds-", suffix=".log")
    flood: list[socket.socket] = []
    try:
        with LimitedKisse({"KISSE_FD_RESERVE": str(FD_RESERVE), "KISSE_HEADER_TIMEOUT": "60"},
                          stderr=log.fileno()) as server:
            keep = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            assert get(keep, "/healthz") == 200
            started = time.monotonic()
            for _ in range(2 * FD_LIMIT):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", server.port))
                flood.append(sock)
            deadline = time.monotonic() + 10
            while open_descriptors(server.pid) < FD_LIMIT - FD_RESERVE and time.monotonic() < deadline:
                time.sleep(0.05)
            assert FD_LIMIT - FD_RESERVE <= open_descriptors(server.pid) <= FD_LIMIT - FD_RESERVE + 2
            time.sleep(1.0)

            # The connections it has are served; a new one is refused at once, not left hanging.
            asked = time.monotonic()
            assert get(keep, "/healthz") == 200
            assert time.monotonic() - asked < 2.0
            with pytest.raises(OSError):  # reset (or closed) by the server
                get(http.client.HTTPConnection("127.0.0.1", server.port, timeout=10), "/healthz")
            assert time.monotonic() - asked < 5.0

            for sock in flood:
                sock.close()
            flood.clear()
            deadline = time.monotonic() + 15
            while True:
                try:
                    if get(http.client.HTTPConnection("127.0.0.1", server.port, timeout=5), "/healthz") == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "new connections are still refused"
                time.sleep(0.1)
            assert get(keep, "/healthz") == 200
            elapsed = time.monotonic() - started
            keep.close()
    finally:
        for sock in flood:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    lines = [json.loads(line) for line in log_text(log).splitlines() if line.startswith("{")]
    text = log_text(log)
    assert "Traceback" not in text and not [line for line in lines if line["level"] == "ERROR"], text[-3000:]
    warnings = [line for line in lines if line["message"].startswith("refusing new connections")]
    assert 1 <= len(warnings) <= elapsed + 2, len(warnings)  # a warning a second at most
    assert sum(line["refused"] for line in warnings) > 2 * len(warnings)  # counted, not logged one by one
    assert any(line["message"] == "accepting new connections again" for line in lines)


class Ok(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("ok")


def test_accept_rests_instead_of_spinning_when_accept_finds_no_descriptor(caplog):
    """Where the count is unknown (or wrong), EMFILE from accept() pauses accepting."""
    async def main() -> tuple[int, bytes]:
        server = GuardedHTTPServer(tornado.web.Application([("/healthz", Ok)]), header_timeout=30,
                                   idle_timeout=30, body_timeout=30, body_min_rate=1, fd_reserve=1)
        server.descriptors.take = lambda: True  # type: ignore[method-assign]
        [listening] = tornado.netutil.bind_sockets(0, "127.0.0.1")
        port = listening.getsockname()[1]
        calls = 0
        accept = server._accept

        def counted(sock: socket.socket) -> None:
            nonlocal calls
            calls += 1
            accept(sock)
        server._accept = counted  # type: ignore[method-assign]
        server.add_sockets([listening])
        clients = []
        for _ in range(60):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            clients.append(client)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 10, hard))
        try:
            await asyncio.sleep(1.0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        starved = calls
        for client in clients:
            client.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(100), 10)
        writer.close()
        server.stop()
        await server.close_all_connections()
        return starved, answer

    with caplog.at_level(logging.INFO):
        starved, answer = asyncio.run(main())
    assert starved < 40, f"the accept handler ran {starved} times in a second"
    assert answer.startswith(b"HTTP/1.1 200")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    warnings = [r for r in caplog.records if r.getMessage().startswith("refusing new connections")]
    assert 1 <= len(warnings) <= 3


def test_descriptors_are_counted():
    descriptors = Descriptors(reserve=64)
    assert abs(descriptors.count - (len(os.listdir("/proc/self/fd")) - 1)) <= 2
    assert descriptors.mark == max(descriptors.limit - 64, descriptors.limit // 2)
