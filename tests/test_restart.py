"""Recovery in seconds, with real processes: after a crash, a restart or a
storage stall every client is back and every retried send answered; nothing
lost, nothing duplicated, nothing out of order.

Every test runs `python -m kisse` (or tests/faulty_kisse.py, which dies at a
storage step) against its own mongoeco wire server on a SQLite file, so the
data outlives the server process, and drives it with tests/traffic.py, a
client that reconnects, syncs and resends as docs/API.md asks. Timers are
short (KISSE_WS_PING=1, KISSE_SEND_REPAIR_AFTER=1, KISSE_PRESENCE_GRACE=1) and
every wait is a deadline, generous for a loaded 2-core CI machine.

Figures go to stdout (`pytest -s` shows them), and as JSON lines to the file
`KISSE_TEST_FIGURES` names, when set. `KISSE_TEST_SERVER_ROOT=<dir>`
runs the servers from another checkout (e.g. an older commit's worktree) to
measure it with the same scenarios; the fault tests need this checkout's
storage/faults.py and skip elsewhere.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from tests import backends, mongo_server
from tests.rawws import RawWs
from tests.served import ROOT, KisseProcess
from tests import traffic
from tests.traffic import TrafficClient, clock, percentile

SERVER_ROOT = Path(os.environ.get("KISSE_TEST_SERVER_ROOT") or ROOT).resolve()
JWT_SECRET = "restart-test-secret-that-is-long-enough-for-hs256"  # tokens survive restarts
SHORT_TIMERS = {"KISSE_WS_PING": "1", "KISSE_SEND_REPAIR_AFTER": "1", "KISSE_PRESENCE_GRACE": "1",
                "KISSE_WS_SYNC_GRACE": "1"}
START_DEADLINE = 60.0  # a Python process starting on a loaded machine
SEND_STEPS = ["mongo.send.written", "mongo.send.allocated", "mongo.send.numbered"]
MIB = 1024 * 1024
GET_ATTEMPTS = 10


def figures(title: str, **values: Any) -> None:
    """One line of measurements on stdout, for the closing notes."""
    shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\n[restart figures] {title}: {shown}", flush=True)
    if os.environ.get("KISSE_TEST_FIGURES"):
        with open(os.environ["KISSE_TEST_FIGURES"], "a") as out:
            out.write(json.dumps({"title": title, "server_root": str(SERVER_ROOT), **values}, default=str) + "\n")


# -- processes -------------------------------------------------------------------
class Server(KisseProcess):
    """A Kisse process that logs to a file and can be started, killed and stopped
    without blocking the event loop: `python -m kisse` from SERVER_ROOT, or, with
    `faulty=True`, tests/faulty_kisse.py (this checkout's) running SERVER_ROOT's kisse."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None, faulty: bool = False) -> None:
        super().__init__(env, port=port)
        self.faulty, self.log_path = faulty, log_path
        self.listening_at: float | None = None  # clock() when /healthz first answered

    def start(self) -> "Server":
        # -P: the launcher's own directory stays off sys.path, so kisse comes from SERVER_ROOT.
        argv = [sys.executable, "-P", str(Path(ROOT) / "tests" / "faulty_kisse.py")] if self.faulty \
            else [sys.executable, "-m", "kisse"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=SERVER_ROOT, env={**self.env, "PYTHONPATH": str(SERVER_ROOT)},
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if self.call("GET", "/healthz", timeout=5)[0] == 200:
                    self.listening_at = clock()
                    return self
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"kisse exited with {self.process.returncode} at start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kisse did not answer /healthz in {START_DEADLINE:.0f}s:\n{self.log_tail()}")
            time.sleep(0.01)

    async def started(self) -> "Server":
        return await asyncio.get_running_loop().run_in_executor(None, self.start)

    async def exited(self, timeout: float) -> int:
        """Wait (without blocking the loop) for the process to end; its exit status."""
        assert self.process is not None
        deadline = clock() + timeout
        while self.process.poll() is None:
            if clock() > deadline:
                raise AssertionError(f"kisse still running {timeout:.0f}s later:\n{self.log_tail()}")
            await asyncio.sleep(0.02)
        return self.process.returncode

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.exited(30)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines of every process that wrote to this log."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                lines.append(record)
        return lines

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def metric(self, name: str) -> float:  # type: ignore[override]
        return await asyncio.get_running_loop().run_in_executor(None, KisseProcess.metric, self, name)

    async def rss(self) -> int:
        return self.rss_bytes()


@pytest.fixture
def mongo(tmp_path: Path) -> Iterator[mongo_server.MongoecoServer]:
    """A private mongoeco server on a SQLite file: the data outlives any Kisse process."""
    reason = mongo_server.unavailable_reason()
    if reason:
        if backends.in_ci():
            pytest.fail(f"CI=true but the restart tests cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    server = mongo_server.MongoecoServer(mongo_server.venv_python(), sqlite_path=str(tmp_path / "kisse.sqlite"))
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)  # a stall test that failed half-way
    server.stop()


@pytest.fixture
def servers(tmp_path: Path, mongo: mongo_server.MongoecoServer) -> Iterator[Callable[..., Server]]:
    """`servers(**env)` makes a Server on the test's database; all are stopped at the end."""
    made: list[Server] = []
    log_path = tmp_path / "kisse.log"

    def make(port: int | None = None, faulty: bool = False, **env: str) -> Server:
        server = Server({"KISSE_STORAGE": mongo.uri("kisse_restart"), "KISSE_JWT_SECRET": JWT_SECRET,
                         "KISSE_LOG_LEVEL": "INFO", **SHORT_TIMERS, **env}, log_path, port=port, faulty=faulty)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop(signal.SIGKILL)


def needs_faults() -> None:
    if not (SERVER_ROOT / "storage" / "faults.py").exists():
        pytest.skip(f"{SERVER_ROOT} has no storage/faults.py: its sends have no fault points to die at")


# -- users, conversations, clients --------------------------------------------------
class Api:
    """JSON over HTTP; a request the server never answered (it died) is status 599."""

    def __init__(self, base: str) -> None:
        self.base, self.http = base, AsyncHTTPClient()

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        raw = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        try:
            response = await self.http.fetch(HTTPRequest(self.base + path, method=method, body=raw, headers=headers,
                                                         request_timeout=60), raise_error=False)
        except (OSError, HTTPClientError) as error:  # the connection closed without an answer
            return 599, repr(error)
        if response.code == 599:
            return 599, repr(response.error)
        return response.code, json.loads(response.body) if response.body else None

    async def get(self, path: str, token: str) -> Any:
        """The body of a 200, retrying a 503 after its Retry-After as a client would: after
        a stall the storage may still be working through the backlog for a while (seen on a
        loaded machine 20 s after the stall ended). A storage that never recovers still fails."""
        for _ in range(GET_ATTEMPTS):
            status, body = await self.call("GET", path, token)
            if status != 503:
                break
            await asyncio.sleep(float(body["error"]["details"].get("retry_after", 1)))
        assert status == 200, (path, status, body)
        return body

    async def register(self, username: str) -> tuple[str, dict]:
        status, body = await self.call("POST", "/api/auth/register",
                                       body={"username": username, "password": "password123"})
        assert status == 201, body
        return body["token"], body["user"]

    async def conversation(self, token: str, other: dict) -> str:
        status, body = await self.call("POST", "/api/conversations", token, {"participant_ids": [other["id"]]})
        assert status in (200, 201), body
        return body["conversation"]["id"]

    async def send(self, token: str, conversation_id: str, client_message_id: str) -> dict:
        status, body = await self.call("POST", "/api/messages", token, {"conversation_id": conversation_id,
                                                                         "client_message_id": client_message_id})
        assert status in (200, 201), body
        return body["message"]


async def people(api: Api, pairs: int) -> tuple[list[tuple[str, dict]], list[str]]:
    """2 × pairs users; users 2i and 2i+1 share conversation i."""
    users = [await api.register(f"user{i}") for i in range(2 * pairs)]
    conversations = [await api.conversation(users[2 * i][0], users[2 * i + 1][1]) for i in range(pairs)]
    return users, conversations


def clients_for(base: str, users: list[tuple[str, dict]], conversations: list[str],
                window: int = 20) -> list[TrafficClient]:
    return [TrafficClient(base, token, user_id=user["id"], conversations=[conversations[i // 2]], window=window,
                          backoff_base=0.1, backoff_cap=1.0, name=f"c{i}", seed=i).start()
            for i, (token, user) in enumerate(users)]


async def all_of(clients: list[TrafficClient], condition: Callable[[TrafficClient], bool], timeout: float) -> bool:
    deadline = clock() + timeout
    for client in clients:
        if not await client.wait_for(lambda: condition(client), max(0.0, deadline - clock())):
            return False
    return True


async def ledger(api: Api, users: list[tuple[str, dict]], conversations: list[str],
                 clients: list[TrafficClient]) -> tuple[dict[str, int], list[str]]:
    """tests/traffic.py's `ledger` over this test's users (2i and 2i+1 share conversation i)."""
    return await traffic.ledger(api.get, [users[2 * i][0] for i in range(len(conversations))], conversations,
                                clients)


async def settled_ledger(api: Api, users: list[tuple[str, dict]], conversations: list[str],
                         clients: list[TrafficClient], mongo: mongo_server.MongoecoServer
                         ) -> tuple[dict[str, int], list[str]]:
    """`ledger`, counted again after the server's send repair has had time to run when
    there are holes (a seq "not yet" there fills within KISSE_SEND_REPAIR_AFTER), with
    the conversations' pending lists from storage in the problems if holes remain."""
    counts, problems = await ledger(api, users, conversations, clients)
    if not counts["holes"]:
        return counts, problems
    await asyncio.sleep(3 * float(SHORT_TIMERS["KISSE_SEND_REPAIR_AFTER"]) + 2)
    counts, problems = await ledger(api, users, conversations, clients)
    if counts["holes"]:
        from pymongo import AsyncMongoClient
        client = AsyncMongoClient(mongo.uri("kisse_restart"))
        try:
            async for doc in client.kisse_restart.conversations.find({"_id": {"$in": conversations}}):
                if doc.get("pending"):
                    problems.append(f"{doc['_id']} last_seq {doc['last_seq']} pending {doc['pending']}")
            async for doc in client.kisse_restart.messages.find({"pending_since": {"$exists": True}}):
                problems.append(f"message left pending: {doc['_id']} {doc['client_message_id']}")
        finally:
            await client.close()
    return counts, problems


def assert_ledger(counts: dict[str, int], problems: list[str], ordered: bool = True) -> None:
    """Nothing lost, nothing duplicated, no hole, and (`ordered`) every sender in order."""
    wrong = {k: v for k, v in counts.items() if v and k not in ("messages", "tombstones")
             and (ordered or k != "disordered_senders")}
    assert not wrong, f"{wrong}: {problems[:10]}"


async def caught_up(api: Api, users: list[tuple[str, dict]], conversations: list[str],
                    clients: list[TrafficClient], timeout: float) -> None:
    """Every client holds every seq of its conversation (its peer's messages included)."""
    tops = {}
    for i, conversation_id in enumerate(conversations):
        status, body = await api.call("GET", f"/api/conversations/{conversation_id}", users[2 * i][0])
        tops[conversation_id] = body["conversation"]["last_seq"]

    def complete(client: TrafficClient) -> bool:
        return all(client.cursors()[c] >= top for c, top in tops.items() if c in client.seen)
    ok = await all_of(clients, complete, timeout)
    assert ok, {c.name: (c.cursors(), c.connected, c.synced) for c in clients if not complete(c)}


def log_problems(server: Server) -> list[dict[str, Any]]:
    """Log lines of a server fault: a 500, or an error that is not a storage stall's 503."""
    bad = []
    for record in server.log_lines():
        status = record.get("status")
        if status == 500 or (record.get("level") == "ERROR" and not (isinstance(status, int) and status == 503)):
            bad.append(record)
    return bad


def recovery_figures(title: str, clients: list[TrafficClient], t_down: float, t_listen: float) -> dict[str, Any]:
    """What the stop cost: of the sends not acked when it began, how many the old
    process still answered (a graceful stop), and how soon the new one answered the rest."""
    sends = [s for c in clients for s in c.sends]
    outstanding = [s for s in sends if s.acked_at is None or s.acked_at > t_down]
    drained = [s for s in outstanding if s.acked_at is not None and s.acked_at < t_listen]
    later = [s for s in outstanding if s not in drained]
    after = [s.acked_at - t_listen for s in later if s.acked_at is not None]
    # An app's view: from its (re)send on the new server to the ack.
    latency = [s.acked_at - max(s.last_sent_at or t_listen, t_listen) for s in later if s.acked_at is not None]
    reconnects = [min((t for t in c.syncs if t > t_listen), default=float("inf")) - t_listen for c in clients]
    values = {"sends": len(sends), "unacked_at_stop": len(outstanding), "answered_by_old_process": len(drained),
              "answered_by_new_process": len(after),
              "all_acked_after_listen_s": max(after) if after else 0.0,
              "recovery_p50_s": percentile(after, 50), "recovery_p99_s": percentile(after, 99),
              "ack_latency_p50_ms": 1000 * percentile(latency, 50) if latency else None,
              "ack_latency_p99_ms": 1000 * percentile(latency, 99) if latency else None,
              "all_synced_after_listen_s": max(reconnects)}
    figures(title, **values)
    return values


def shutting_down_logged(server: Server) -> bool:
    return any(r.get("message") == "shutting down" for r in server.log_lines())


# -- a. death at each step of a send ------------------------------------------------------
@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("step", SEND_STEPS)
async def test_a_send_that_killed_the_server_at_any_step_is_answered_once_by_the_next(servers, step):
    needs_faults()
    earlier = 3  # sends that go through before the one that dies
    first = await servers(faulty=True, KISSE_TEST_DIE_AT=step,
                          KISSE_TEST_DIE_ON_HIT=str(earlier + 1)).started()
    api = Api(first.base)
    users, (conversation,) = await people(api, 1)
    (token, _), (peer_token, _) = users
    for n in range(earlier):
        await api.send(token, conversation, f"before-{n}")
    body = {"conversation_id": conversation, "client_message_id": "the-one"}
    status, answer = await api.call("POST", "/api/messages", token, body)
    assert status == 599, (status, answer)  # no answer: the process died in the middle
    assert await first.exited(30) == 137
    assert f"dying at {step}" in first.log_path.read_text()

    second = await servers(port=first.port).started()
    t0 = clock()
    status, answer = await api.call("POST", "/api/messages", token, body)
    answered = clock() - second.listening_at
    assert status in (200, 201), answer
    messages = await traffic.history(api.get, peer_token, conversation)
    seqs = [m["seq"] for m in messages]
    tombstones = sum(1 for m in messages if m.get("tombstone"))
    ours = [m for m in messages if m.get("client_message_id") == "the-one"]
    figures(f"a {step}", status=status, answered_after_listen_s=answered, request_s=clock() - t0,
            seqs=seqs, tombstones=tombstones)
    assert answered < 2.0
    assert len(ours) == 1 and ours[0]["seq"] == answer["message"]["seq"] == earlier + 1
    assert seqs == list(range(1, len(seqs) + 1))


# -- b. kill -9 under load ------------------------------------------------------------------
# 20 clients. mongoeco numbers about 20 sends a second on this machine (every write to
# `messages` scans the collection for its partial unique indexes), so the test keeps
# 100 sends in flight: the storage's own time stays well inside the 10 s target.
# `python -m benchmarks --only restart` runs the full 500 (and a control without a crash).
PAIRS = 10
SENDS_EACH = int(os.environ.get("KISSE_TEST_RESTART_SENDS_EACH", "5"))


async def traffic_through_a_stop(servers, mongo, stop: str) -> dict[str, Any]:
    """20 clients with every send in flight; the server stops (`kill`: SIGKILL,
    `term`: SIGTERM) once a tenth are acked, and a new one starts on the port."""
    first = await servers().started()
    api = Api(first.base)
    users, conversations = await people(api, PAIRS)
    clients = clients_for(first.base, users, conversations, window=2 * SENDS_EACH)
    try:
        return await _through_a_stop(servers, mongo, stop, first, api, users, conversations, clients)
    finally:
        for client in clients:
            await client.stop()


async def _through_a_stop(servers, mongo, stop, first, api, users, conversations, clients) -> dict[str, Any]:
    assert await all_of(clients, lambda c: c.synced, 30), "clients did not connect"
    for i, client in enumerate(clients):
        for _ in range(SENDS_EACH):
            client.send(conversations[i // 2])
    total = PAIRS * 2 * SENDS_EACH
    deadline = clock() + 60
    while sum(1 for c in clients for s in c.sends if s.acked_at) < total // 10:  # mid-traffic
        assert clock() < deadline, "traffic did not start"
        await asyncio.sleep(0.002)
    t_down = clock()
    acked_before = sum(1 for c in clients for s in c.sends if s.acked_at)
    if stop == "kill":
        await first.kill()
    else:
        first.process.send_signal(signal.SIGTERM)
        while not shutting_down_logged(first) and first.process.poll() is None:
            await asyncio.sleep(0.01)
        # Sent while it drains: refused with shutting_down, to be sent again after the restart.
        for i, client in enumerate(clients):
            for _ in range(2):
                client.send(conversations[i // 2])
    exit_status = await first.exited(30)
    t_exit = clock()
    second = await servers(port=first.port).started()
    t_listen = second.listening_at
    acked_in_time = await all_of(clients, lambda c: not c.unacked(), 10 - (clock() - t_listen))
    all_acked = await all_of(clients, lambda c: not c.unacked(), 60)
    synced = await all_of(clients, lambda c: c.synced and c.syncs[-1] > t_listen, 30)
    values = recovery_figures(f"{stop} under load", clients, t_down, t_listen)
    values.update(acked_before_stop=acked_before, exit_status=exit_status, stop_took_s=t_exit - t_down,
                  new_process_listening_after_exit_s=t_listen - t_exit)
    figures(f"{stop} timings", acked_before_stop=acked_before, exit_status=exit_status,
            stop_took_s=t_exit - t_down, new_process_listening_after_exit_s=t_listen - t_exit)
    counts, problems = await settled_ledger(api, users, conversations, clients, mongo)
    figures(f"{stop} ledger", **counts)
    assert all_acked, f"{sum(len(c.unacked()) for c in clients)} sends never acked"
    assert acked_in_time, f"not all acked within 10 s of the new process listening: {values}"
    back = {c.name: (len(c.connects), [round(t - t_listen, 2) for t in c.syncs], [x.code for x in c.closes])
            for c in clients if not (len(c.connects) >= 2 and c.syncs[-1] > t_listen)}
    assert synced and not back, f"clients not reconnected and synced after the restart: {back}"
    assert_ledger(counts, problems)
    values.update(counts)
    await caught_up(api, users, conversations, clients, 20)
    values["closes"] = Counter(x.code for c in clients for x in c.closes)
    values["errors"] = sum((c.error_codes for c in clients), Counter())
    values["second"] = second
    return values


@pytest.mark.gen_test(timeout=150)
async def test_kill_9_under_load_loses_nothing_duplicates_nothing_and_recovers_in_seconds(servers, mongo):
    values = await traffic_through_a_stop(servers, mongo, "kill")
    assert values["exit_status"] == -signal.SIGKILL
    assert values["messages"] == PAIRS * 2 * SENDS_EACH  # tombstones (a rare race burns a seq) are allowed


@pytest.mark.gen_test(timeout=150)
async def test_sigterm_under_load_drains_then_the_restart_takes_over(servers, mongo):
    values = await traffic_through_a_stop(servers, mongo, "term")
    assert values["exit_status"] == 0
    assert values["messages"] == PAIRS * 2 * (SENDS_EACH + 2)
    assert values["closes"][1001] == 2 * PAIRS, values["closes"]  # every connection told to go elsewhere
    assert set(values["errors"]) <= {"shutting_down"}, values["errors"]
    assert values["answered_by_old_process"] > 0  # it finished what it had taken
    problems = log_problems(values["second"])  # both processes wrote to this log
    assert not problems, problems[:5]


# -- d. a storage stall ---------------------------------------------------------------------
STALL_S = 10.0
# A known server bug (reported, not fixed here): a seq allocation that timed out in the
# stall can still be applied by the database afterwards, after the message was numbered
# with another seq; that late allocation burns a seq nobody buries, and leaves a stale
# entry in the conversation's `pending`. Seen in about one stall in ten.
WATCH_AFTER_S = 20.0  # with the stall: 30 intervals of KISSE_WS_PING=1 in which nobody may be dropped


class Handshake:
    """A raw WebSocket upgrade, to see exactly what a client gets while storage stalls:
    `outcome` is 101 (then `ws` answers pings until closed), another status with
    its JSON `body`, or "gave up" (the client closed its socket before any answer)."""

    def __init__(self, port: int, token: str, give_up_after: float | None = None) -> None:
        self.port, self.token, self.give_up_after = port, token, give_up_after
        self.outcome: int | str | None = None
        self.body: Any = None
        self.took: float | None = None
        self.ws: RawWs | None = None
        self._reader: asyncio.Task[None] | None = None

    async def run(self) -> "Handshake":
        t0 = clock()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write((f"GET /ws?token={self.token} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.give_up_after or 60)
        except asyncio.TimeoutError:
            if self.give_up_after is None:
                raise
            writer.close()
            self.outcome, self.took = "gave up", clock() - t0
            return self
        self.took = clock() - t0
        self.outcome = int(head.split()[1])
        if self.outcome == 101:
            self.ws = RawWs(reader, writer)
            self._reader = asyncio.get_running_loop().create_task(self._keep_reading())
            return self
        length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")), 0)
        self.body = json.loads(await reader.readexactly(length)) if length else None
        writer.close()
        return self

    async def _keep_reading(self) -> None:
        assert self.ws is not None
        try:
            while (await self.ws.frame())[0] != 0x8:  # pings are answered on the way
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        self.ws = None

    @property
    def open(self) -> bool:
        return self.ws is not None

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self._reader is not None:
            self._reader.cancel()


@pytest.mark.gen_test(timeout=150)
async def test_a_storage_stall_drops_no_client_and_every_send_lands_once(servers, mongo):
    server = await servers().started()
    api = Api(server.base)
    users, conversations = await people(api, PAIRS)
    clients = clients_for(server.base, users, conversations, window=20)
    handshakes: list[Handshake] = []
    try:
        assert await all_of(clients, lambda c: c.synced, 30), "clients did not connect"
        for i, client in enumerate(clients):
            for _ in range(3):
                client.send(conversations[i // 2])
        while sum(1 for c in clients for s in c.sends if s.acked_at) < 10:
            await asyncio.sleep(0.005)
        mongo.process.send_signal(signal.SIGSTOP)
        t_stop = clock()
        try:
            await asyncio.sleep(1)
            for i, client in enumerate(clients):  # pipelined into the stall
                for _ in range(3):
                    client.send(conversations[i // 2])
            await asyncio.sleep(1)
            waiting = Handshake(server.port, users[0][0])
            quitter = Handshake(server.port, users[1][0], give_up_after=0.5)
            handshaking = asyncio.gather(waiting.run(), quitter.run())
            handshakes = [waiting, quitter]
            await asyncio.sleep(max(0.0, STALL_S - (clock() - t_stop)))
        finally:
            mongo.process.send_signal(signal.SIGCONT)
        t_cont = clock()
        await handshaking
        unacked_at_cont = sum(len(c.unacked()) for c in clients)
        all_acked = await all_of(clients, lambda c: not c.unacked(), 60)
        t_acked = clock()
        # Watch: nobody dropped, and the server counts exactly the sockets that are open.
        counted: list[tuple[float, float, int]] = []
        while clock() < t_cont + WATCH_AFTER_S:
            expected = len(clients) + sum(1 for h in handshakes if h.open)
            counted.append((clock() - t_cont, await server.metric("kisse_ws_connections"), expected))
            await asyncio.sleep(0.5)
        dropped = {c.name: [(round(x.at - t_stop, 2), x.code) for x in c.closes] for c in clients if c.closes}
        settled = [(t, n, e) for t, n, e in counted if t > 5.0]  # a cut socket may take a moment to notice
        stored, problems = await settled_ledger(api, users, conversations, clients, mongo)
        errors = sum((c.error_codes for c in clients), Counter())
        figures("storage stall", stall_s=t_cont - t_stop, unacked_at_cont=unacked_at_cont,
                all_acked_after_cont_s=t_acked - t_cont, dropped=len(dropped), errors=dict(errors),
                handshake=waiting.outcome, handshake_s=waiting.took, handshake_body=waiting.body,
                quitter=quitter.outcome, ghosts=max((n - e for _, n, e in settled), default=None), **stored)
        assert all_acked, f"{sum(len(c.unacked()) for c in clients)} sends never acked"
        # Sends that failed with storage_unavailable are resent later, behind others: no order to check.
        assert_ledger(stored, problems, ordered=False)
        assert stored["messages"] == PAIRS * 2 * 6
        assert not dropped, f"clients closed during or after the stall: {dropped}"
        assert all(len(c.connects) == 1 for c in clients)
        assert waiting.outcome == 101 or (waiting.outcome == 503 and waiting.body["error"]["code"]
                                          == "storage_unavailable"), (waiting.outcome, waiting.body)
        assert quitter.outcome == "gave up"
        assert settled and all(n == e for _, n, e in settled), f"kisse_ws_connections vs open sockets: {counted}"
    finally:
        for handshake in handshakes:
            handshake.close()
        for client in clients:
            await client.stop()


# -- e. memory that comes back --------------------------------------------------------------
CYCLES = 300
RSS_BOUND = 8 * MIB  # generous: allocator slack and caches, not 300 connections' worth of leaks


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: the peer gets no close frame, no FIN handshake."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


async def connect_and_cut(port: int, token: str, conversation_id: str, n: int) -> None:
    """One of five ways a phone leaves: cut after the upgrade, after a sync, in the middle
    of a send, before the upgrade is even answered, or politely."""
    kind = n % 5
    if kind == 3:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        rst_close(writer)
        return
    ws = await RawWs.connect(port, token)
    if kind == 1:
        ws.send("sync", {"cursors": {}}, "s")
        await ws.reply("s")
    elif kind == 2:
        ws.send("message.send", {"conversation_id": conversation_id, "client_message_id": f"cut-{n}"}, "m")
        await ws.writer.drain()
    elif kind == 4:
        ws.send_frame(0x8, b"\x03\xe8")
        try:
            await asyncio.wait_for(ws.frame(), 10)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        ws.close()
        return
    rst_close(ws.writer)


@pytest.mark.gen_test(timeout=150)
async def test_memory_and_connection_count_come_back_after_300_cut_connections(servers):
    server = await servers(KISSE_GC_INTERVAL="1").started()
    api = Api(server.base)
    users, (conversation,) = await people(api, 1)
    token = users[0][0]

    async def cycles(first: int, count: int) -> None:
        gate = asyncio.Semaphore(10)

        async def one(n: int) -> None:
            async with gate:
                await connect_and_cut(server.port, token, conversation, n)
        await asyncio.gather(*(one(n) for n in range(first, first + count)))

    async def connections_gone(timeout: float) -> float:
        """Seconds until /metrics counts no WebSocket (or the count left after `timeout`)."""
        deadline, t0 = clock() + timeout, clock()
        while (count := await server.metric("kisse_ws_connections")) != 0 and clock() < deadline:
            await asyncio.sleep(0.2)
        return clock() - t0 if count == 0 else float("inf")

    await cycles(0, 50)  # warm-up: the first connections fill caches and pools
    await connections_gone(30)
    await asyncio.sleep(3)  # a few collections (KISSE_GC_INTERVAL=1)
    samples = []
    for _ in range(3):
        samples.append(await server.rss())
        await asyncio.sleep(0.5)
    baseline = min(samples)
    t0 = clock()
    await cycles(50, CYCLES)
    took = clock() - t0
    peak = await server.rss()
    gone_after = await connections_gone(30)
    left = await server.metric("kisse_ws_connections")
    deadline = clock() + 30
    rss = await server.rss()
    while rss > baseline + RSS_BOUND and clock() < deadline:
        await asyncio.sleep(1)
        rss = await server.rss()
    figures("connect-and-cut", cycles=CYCLES, cycles_s=took, baseline_mib=baseline / MIB, peak_mib=peak / MIB,
            after_mib=rss / MIB, growth_kib=(rss - baseline) / 1024, connections_left=left,
            connections_zero_after_s=gone_after)
    assert left == 0, f"{left} connections still counted 30 s after every socket was cut"
    assert rss <= baseline + RSS_BOUND, f"RSS {rss / MIB:.1f} MiB, baseline {baseline / MIB:.1f} MiB"
