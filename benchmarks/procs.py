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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


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
