"""Stopping a child server the one way every helper does (tests and benchmarks)."""
from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any] | None, signum: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int | None:
    """Send `signum`, wait up to `timeout` seconds, then SIGKILL. The exit code (negative
    for a signal, as Popen has it), or None when there was no process."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode
