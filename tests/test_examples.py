"""The quick-start examples (docs/QUICKSTART.md) run end to end against a real `python -m kisse`."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    port = free_port()
    env = {**os.environ, "KISSE_PORT": str(port), "KISSE_HOST": "127.0.0.1", "KISSE_BCRYPT_ROUNDS": "4",
           "KISSE_STORAGE": "memory://", "KISSE_ENV": "development"}
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen([sys.executable, "-m", "kisse"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"kisse did not come up (exit code {process.poll()}):\n{log.read()}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_lines_in_order(output: str, fragments: list[str]) -> None:
    position = 0
    for fragment in fragments:
        found = output.find(fragment, position)
        assert found >= 0, f"{fragment!r} missing (or out of order) in:\n{output}"
        position = found + len(fragment)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed: examples/quickstart.sh needs it")
def test_quickstart_sh(base_url):
    result = run(["bash", os.path.join(EXAMPLES, "quickstart.sh")], env={"BASE_URL": base_url})
    assert_lines_in_order(result.stdout, [
        f"== 0. server at {base_url}", "ok",
        "== 1. register alice_", "alice id=", "bob   id=",
        "== 2. alice creates a direct conversation with bob", "kind=direct",
        "bob accepts the request: state=accepted",
        "== 3. alice sends a message", "seq=1 client_message_id=",
        "== 4. bob reads the conversation history", "seq=1 from=",
        "ciphertext=cHJldGVuZCB0aGlzIGlzIGVuY3J5cHRlZA==",
        "== 5. bob marks the message read", "receipt delivered_seq=1 read_seq=1",
        "== 6. alice checks the receipts", "delivered=True read=True",
        "OK: alice_",
    ])
    assert result.stderr == ""


def test_quickstart_py(base_url):
    started = time.monotonic()
    result = run([sys.executable, os.path.join(EXAMPLES, "quickstart.py"), "--base-url", base_url])
    assert time.monotonic() - started < 10
    assert_lines_in_order(result.stdout, [
        "== 1. register alice and bob (REST)",
        "== 2. alice creates a direct conversation with bob (REST)", "kind=direct",
        "bob accepts the request: state=accepted",
        "== 3. both open the WebSocket and sync",
        "alice: WebSocket open", "bob: WebSocket open",
        "alice <- ack sync: 0 message(s)", "bob <- ack sync: 0 message(s)",
        "== 4. alice sends a message over the WebSocket",
        "alice -> message.send", "alice <- ack message.send: id=", "seq=1 created=True",
        "== 5. bob receives it live", "bob <- message.new: id=",
        "== 6. bob marks it read; alice gets the receipt",
        "bob -> message.read", "bob <- ack message.read: read_seq=1",
        "alice <- message.receipt: user_id=", "read_seq=1",
        "OK: alice_",
    ])
    assert "FAILED" not in result.stderr


def test_quickstart_py_fails_clearly_when_the_server_is_unreachable():
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py"),
                             "--base-url", f"http://127.0.0.1:{free_port()}", "--timeout", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("FAILED: GET /healthz: cannot reach"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed: examples/quickstart.sh needs it")
def test_quickstart_sh_fails_clearly_when_the_server_is_unreachable():
    result = subprocess.run(["bash", os.path.join(EXAMPLES, "quickstart.sh")], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, env={**os.environ, "BASE_URL": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 1
    assert "FAILED: GET /healthz: cannot reach" in result.stderr
    assert "Traceback" not in result.stderr
