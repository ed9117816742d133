"""Real `python -m kisse` processes for tests that need the whole server:
signals, memory, restarts, several nodes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from tests.processes import stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 30.0  # generous: a loaded 2-core CI machine starts Python slowly


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KisseProcess:
    """One server process on a free loopback port; `with` starts and stops it."""

    def __init__(self, env: dict[str, str] | None = None, port: int | None = None,
                 stderr: int | None = subprocess.DEVNULL) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, "KISSE_PORT": str(self.port), "KISSE_HOST": "127.0.0.1",
                    "KISSE_BCRYPT_ROUNDS": "4", "KISSE_RATE_LIMITS": "off", **(env or {})}
        self.stderr = stderr
        self.process: subprocess.Popen[str] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> "KisseProcess":
        self.process = subprocess.Popen([sys.executable, "-m", "kisse"], cwd=ROOT, env=self.env,
                                        stderr=self.stderr, text=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"kisse exited with {self.process.returncode} at start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("kisse did not answer /healthz in time")
            time.sleep(0.05)

    def __enter__(self) -> "KisseProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        process, self.process = self.process, None
        return stop_process(process, signum, timeout)

    def call(self, method: str, path: str, token: str | None = None, body: Any = None,
             raw: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
        """`(status, parsed JSON or raw bytes)`, whatever the status."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else raw
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, content, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, content, kind = error.code, error.read(), error.headers.get("Content-Type", "")
        return status, json.loads(content) if kind.startswith("application/json") else content

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric in /metrics."""
        _, text = self.call("GET", "/metrics")
        for line in text.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)
