"""npm packages for the test suites, installed once into `.kisse-test/node-tools/`.

Some checks need a tool that only exists on npm (the official AsyncAPI parser).
`require("name@1.2.3")` installs that exact version on first use into a prefix
of its own, `.kisse-test/node-tools/<name@1.2.3>/` (git-ignored), under a file
lock so that parallel pytest processes install it once, and returns the
prefix. Without `node`/`npm`, or when the install fails, the test skips with
the reason; with `CI=true` it fails instead (as the Mongo suite does, see
tests/backends.py).
"""
from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.backends import in_ci

TOOLS = Path(__file__).resolve().parent.parent / ".kisse-test" / "node-tools"
INSTALL_TIMEOUT = 600


class Unavailable(RuntimeError):
    """`node`/`npm` are missing, or the package did not install."""


def install(spec: str) -> Path:
    """The npm prefix holding `spec` (`name@exact-version`), installed on first use."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise Unavailable(f"`{tool}` is not on PATH")
    prefix = TOOLS / spec.replace("/", "+")  # "@scope/name@1" -> one flat directory per pin
    marker = prefix / ".kisse-requirement"
    TOOLS.mkdir(parents=True, exist_ok=True)
    with open(TOOLS / f"{prefix.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest processes must not install at once
        if marker.exists() and marker.read_text() == spec:
            return prefix
        if prefix.exists():
            shutil.rmtree(prefix)  # an interrupted install: start again
        prefix.mkdir()
        # --ignore-scripts: the tools need no install scripts (and some only phone home).
        command = ["npm", "install", "--no-audit", "--no-fund", "--save-exact", "--ignore-scripts",
                   "--prefix", str(prefix), spec]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"npm install {spec} took over {INSTALL_TIMEOUT} s") from None
        if result.returncode != 0:
            raise Unavailable(f"npm install {spec} failed:\n{result.stderr[-4000:]}")
        marker.write_text(spec)  # last: only a complete install counts
        return prefix


def require(spec: str) -> Path:
    """`install(spec)`, or skip the calling test with the reason (fail when `CI=true`)."""
    try:
        return install(spec)
    except Unavailable as exc:
        reason = f"{spec} is unavailable: {exc}"
    # Outside the `except`, so the report shows the reason, not a chained traceback.
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)
