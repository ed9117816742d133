"""mongoeco's MongoDB wire server for the test suites, run by the real driver.

No MongoDB server installs here, so the Mongo backend is tested, driver
unchanged, against mongoeco's wire-protocol server. mongoeco needs Python >=
3.13: we find one (pyenv's versions, else `python3.13`/`python3.14` on PATH,
or `KISSE_TEST_PYTHON` when set), build a venv for it once in
`.kisse-test/mongoeco-venv/` (git-ignored) with `mongoeco[wire]==4.11.0`, and
run `tests/mongoeco_launcher.py` with it as a subprocess on a free loopback
port. One server serves the whole session; each test gets its own database.

When no suitable interpreter exists, `unavailable_reason()` says why so the
Mongo params skip visibly (tests/backends.py turns that into a failure when
`CI=true`).
"""
from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from tests.processes import stop_process

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".kisse-test"
VENV = CACHE / "mongoeco-venv"
REQUIREMENT = "mongoeco[wire]==4.11.0"
LAUNCHER = Path(__file__).resolve().parent / "mongoeco_launcher.py"
MIN_VERSION = (3, 13)
START_TIMEOUT = 60.0


def _version_of(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _candidates() -> list[str]:
    found: list[str] = []
    if os.environ.get("KISSE_TEST_PYTHON"):
        found.append(os.environ["KISSE_TEST_PYTHON"])
    pyenv_root = os.environ.get("PYENV_ROOT")
    if not pyenv_root and shutil.which("pyenv"):
        try:
            pyenv_root = subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pyenv_root = None
    for root in filter(None, [pyenv_root, str(Path.home() / ".pyenv")]):
        versions = Path(root) / "versions"
        if versions.is_dir():
            def key(p: Path) -> tuple[int, ...]:
                return tuple(int(x) for x in re.findall(r"\d+", p.name)[:3])
            for entry in sorted((p for p in versions.iterdir() if re.match(r"3\.\d+\.\d+$", p.name)),
                                key=key, reverse=True):
                found.append(str(entry / "bin" / "python3"))
    for name in ("python3.13", "python3.14", "python3"):
        path = shutil.which(name)
        if path:
            found.append(path)
    if sys.version_info >= MIN_VERSION:
        found.append(sys.executable)
    return found


def find_python() -> str | None:
    """An interpreter >= 3.13, or None."""
    seen: set[str] = set()
    for python in _candidates():
        if python in seen or not os.path.exists(python) and not shutil.which(python):
            continue
        seen.add(python)
        version = _version_of(python)
        if version and version >= MIN_VERSION:
            return python
    return None


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(python: str) -> Path:
    """The mongoeco venv's interpreter, creating the venv on first use."""
    marker = VENV / ".kisse-requirement"
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / "mongoeco-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest processes must not build it at once
        if marker.exists() and marker.read_text() == REQUIREMENT and _venv_python().exists():
            return _venv_python()
        if VENV.exists():
            shutil.rmtree(VENV)
        subprocess.run([python, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        result = subprocess.run([str(_venv_python()), "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", REQUIREMENT],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"pip install {REQUIREMENT} failed:\n{result.stderr[-4000:]}")
        marker.write_text(REQUIREMENT)
        return _venv_python()


class MongoecoServer:
    """One mongoeco wire server subprocess (in-memory engine, or SQLite on `sqlite_path`)."""

    def __init__(self, python: Path, sqlite_path: str | None = None, port: int = 0) -> None:
        self.python, self.sqlite_path, self.port = python, sqlite_path, port
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> "MongoecoServer":
        args = [str(self.python), str(LAUNCHER), "--port", str(self.port)]
        if self.sqlite_path:
            args += ["--sqlite", self.sqlite_path]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if not line or not line[0].startswith("READY "):
            self.stop()
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise RuntimeError(f"mongoeco wire server did not start: {stderr[-4000:]}")
        self.port = int(line[0].split()[1])
        # Drain stderr so a chatty server never blocks on a full pipe.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)

    def uri(self, database: str, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"directConnection": "true", **options}.items())
        return f"mongodb://127.0.0.1:{self.port}/{database}?{query}"


_lock = threading.Lock()
_python: Path | None = None
_reason: str | None = None
_checked = False
_server: MongoecoServer | None = None


def unavailable_reason() -> str | None:
    """Why mongoeco cannot run here, or None when it can (checked once)."""
    global _checked, _python, _reason
    with _lock:
        if not _checked:
            _checked = True
            python = find_python()
            if python is None:
                _reason = ("no Python >= 3.13 found (pyenv versions, python3.13 on PATH or "
                           "KISSE_TEST_PYTHON) to run mongoeco's MongoDB wire server")
            else:
                try:
                    _python = ensure_venv(python)
                except Exception as exc:  # noqa: BLE001 - reported as the skip reason
                    _reason = f"could not build the mongoeco venv: {exc}"
        return _reason


def venv_python() -> Path:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    assert _python is not None
    return _python


def shared_server() -> MongoecoServer:
    """The session's in-memory mongoeco server, started on first use, stopped at exit."""
    global _server
    python = venv_python()
    with _lock:
        if _server is None or _server.process is None or _server.process.poll() is not None:
            _server = MongoecoServer(python).start()
            atexit.register(_server.stop)
        return _server
