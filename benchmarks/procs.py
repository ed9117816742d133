"""Server processes for the benchmarks: free loopback ports, start/stop, /proc readings.

Everything here targets 127.0.0.1 only.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.processes import stop_process

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_JWT_SECRET = "benchmark-secret-" + "x" * 40


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def rss(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def outbound_connections(pid: int, listen_port: int) -> int:
    """TCP connections of a process that it opened itself (its storage pool, Redis):
    its sockets in /proc/net/tcp whose local port is not the one it listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if inode in inodes and state == "01" and local_port != listen_port:  # 01: ESTABLISHED
                count += 1
    return count


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "".join(Path(self.log_path).read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited in `timeout` seconds."""
        return stop_process(self.proc, timeout=timeout)


def _wait_ready(server: Server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.base + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout}s:\n{server.log_tail()}")


def _spawn(name: str, argv: list[str], env: dict[str, str], port: int, log_dir: str) -> Server:
    log_path = os.path.join(log_dir, f"{name}-{port}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=raise_nofile)
    server = Server(name, port, proc, log_path, env)
    _wait_ready(server)
    return server


def start_kisse(log_dir: str, **overrides: str) -> Server:
    """`python -m kisse` with in-memory storage on a free loopback port."""
    port = free_port()
    kisse_env = {
        "KISSE_HOST": HOST,
        "KISSE_PORT": str(port),
        "KISSE_STORAGE": "memory://",
        "KISSE_JWT_SECRET": BENCH_JWT_SECRET,
        "KISSE_BCRYPT_ROUNDS": "4",
        # Benchmark clients read as fast as they can; never drop them as slow consumers.
        "KISSE_WS_QUEUE_BYTES": str(1 << 30),
        # Same as the bare baseline, which has no access log either.
        "KISSE_LOG_LEVEL": "WARNING",
        # Load far past what a person does: the abuse limits would refuse it (the relay
        # scenario measures them on, with limits a benchmark never reaches, against off).
        "KISSE_RATE_LIMITS": "off",
        **overrides,
    }
    env = {**os.environ, **kisse_env, "PYTHONUNBUFFERED": "1"}
    server = _spawn("kisse", [sys.executable, "-m", "kisse"], env, port, log_dir)
    server.env = kisse_env
    return server


def start_bare(log_dir: str) -> Server:
    """The bare Tornado baseline (benchmarks/bare_server.py)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return _spawn("bare", [sys.executable, "-m", "benchmarks.bare_server", "--port", str(port)],
                  env, port, log_dir)


def new_log_dir() -> str:
    return tempfile.mkdtemp(prefix="kisse-bench-")


# -- the restart and soak scenarios: MongoDB storage outside the server, Kisse from any checkout --
_mongo_count = 0


def kisse_root() -> Path:
    """The checkout whose `python -m kisse` the restart and soak scenarios run: this
    one, or KISSE_BENCH_KISSE_ROOT (e.g. an older commit's worktree, to compare)."""
    return Path(os.environ.get("KISSE_BENCH_KISSE_ROOT") or ROOT).resolve()


@dataclass
class Mongo:
    """MongoDB for a scenario: KISSE_BENCH_MONGODB_URI if set, else a mongoeco wire
    server of our own (tests/mongo_server.py: SQLite on a file in the log dir, or in memory)."""

    base_uri: str
    server: object | None = None  # tests.mongo_server.MongoecoServer

    def uri(self, database: str) -> str:
        parts = urlsplit(self.base_uri)
        return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def start_mongo(log_dir: str, persistent: bool) -> Mongo:
    global _mongo_count
    if os.environ.get("KISSE_BENCH_MONGODB_URI"):
        return Mongo(os.environ["KISSE_BENCH_MONGODB_URI"])
    from tests import mongo_server
    reason = mongo_server.unavailable_reason()
    if reason:
        raise RuntimeError(f"no MongoDB for this scenario: {reason} (or set KISSE_BENCH_MONGODB_URI)")
    _mongo_count += 1
    sqlite = os.path.join(log_dir, f"mongoeco-{_mongo_count}.sqlite") if persistent else None
    server = mongo_server.MongoecoServer(mongo_server.venv_python(), sqlite_path=sqlite).start()
    return Mongo(server.uri("kisse"), server)


def kisse_spec(log_dir: str, storage: str, port: int | None = None, **overrides: str) -> dict[str, object]:
    """How to start `python -m kisse` from `kisse_root()` on MongoDB storage: argv, cwd,
    env and log file, as JSON, so a load generator can start it again after killing it."""
    port = port or free_port()
    kisse_env = {"KISSE_HOST": HOST, "KISSE_PORT": str(port), "KISSE_STORAGE": storage,
                 "KISSE_JWT_SECRET": BENCH_JWT_SECRET, "KISSE_BCRYPT_ROUNDS": "4",
                 "KISSE_WS_QUEUE_BYTES": str(1 << 30), "KISSE_LOG_LEVEL": "WARNING",
                 "KISSE_RATE_LIMITS": "off", **overrides}  # as start_kisse: load far past a person's
    root = kisse_root()
    return {"argv": [sys.executable, "-m", "kisse"], "cwd": str(root), "port": port, "kisse_env": kisse_env,
            "env": {**os.environ, **kisse_env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)},
            "log_path": os.path.join(log_dir, f"kisse-{port}.log")}


def spawn(spec: dict[str, object]) -> subprocess.Popen:
    """Start the process a `kisse_spec` describes (appending to its log); not waiting for it."""
    with open(str(spec["log_path"]), "ab") as log:
        return subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"], stdout=log,  # type: ignore[arg-type]
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=raise_nofile)


def start_kisse_spec(spec: dict[str, object]) -> Server:
    server = Server("kisse", int(spec["port"]), spawn(spec), str(spec["log_path"]),  # type: ignore[arg-type]
                    dict(spec["kisse_env"]))  # type: ignore[arg-type]
    _wait_ready(server, timeout=60)
    return server


def wait_listening(port: int, timeout: float, interval: float = 0.01) -> float:
    """`time.perf_counter()` when /healthz first answers 200 on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"nothing answered /healthz on port {port} within {timeout:.0f}s")


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process that is not our child, then SIGKILL it if it lingers."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# -- the cluster scenario: several Kisse nodes on one MongoDB and one Redis -------------
@dataclass
class Redis:
    """Debian's redis-server on a free loopback port (tests/redis_server.py), no persistence."""

    server: object  # tests.redis_server.RedisServer

    @property
    def url(self) -> str:
        return self.server.url  # type: ignore[attr-defined]

    @property
    def pid(self) -> int:
        return self.server.process.pid  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.server.stop()  # type: ignore[attr-defined]


def start_redis() -> Redis:
    from tests import redis_server
    reason = redis_server.unavailable_reason()
    if reason:
        raise RuntimeError(f"no Redis for this scenario: {reason}")
    return Redis(redis_server.RedisServer().start())


def mongo_pid(mongo: Mongo) -> int | None:
    """The mongoeco wire server's pid, or None for KISSE_BENCH_MONGODB_URI (not ours to measure)."""
    process = getattr(mongo.server, "process", None)
    return None if process is None else process.pid


def start_cluster(log_dir: str, storage: str, bus: str, nodes: int, **overrides: str) -> list[Server]:
    """`nodes` Kisse processes on the same MongoDB database and Redis bus (KISSE_BUS),
    sharing the JWT secret, each on its own free port. All stopped again if one fails."""
    servers: list[Server] = []
    try:
        for _ in range(nodes):
            servers.append(start_kisse_spec(kisse_spec(log_dir, storage, KISSE_BUS=bus, **overrides)))
    except Exception:
        for server in servers:
            server.stop()
        raise
    return servers
