"""Named points inside multi-step storage operations, where tests make a step
fail (or the process die) to prove that nothing is lost or duplicated.

Inert in production: `point()` does nothing unless a test has armed it
(tests/faulty_kisse.py arms them in a real server process)."""
from __future__ import annotations

from collections.abc import Callable

_armed: dict[str, Callable[[], None]] = {}


def point(name: str) -> None:
    """Reached a step of a multi-step operation."""
    action = _armed.get(name)
    if action is not None:
        action()


def arm(name: str, action: Callable[[], None]) -> None:
    _armed[name] = action


def disarm() -> None:
    _armed.clear()
