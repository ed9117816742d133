"""Test only: `python -m tests.faulty_kisse [kisse flags]` is `python -m kisse`
with one storage fault point (storage/faults.py) armed to kill the process on
the spot, as a power cut or `kill -9` would, in the middle of a multi-step write.

    KISSE_TEST_DIE_AT=mongo.send.allocated   the point (unset: an ordinary server)
    KISSE_TEST_DIE_ON_HIT=3                  die the 3rd time it is reached (default 1)

Dying is `os._exit(137)` (the status a shell shows for SIGKILL): no cleanup,
no buffered output flushed, no socket closed politely, nothing of the step
after the point written. One line goes to stderr first, unbuffered, so a test
can tell the death it asked for from any other.

It imports only kisse and storage, so `python -P tests/faulty_kisse.py` with
PYTHONPATH set to another checkout runs that checkout's server.
"""
from __future__ import annotations

import os
import sys

from storage import faults

DIE_AT, DIE_ON_HIT = "KISSE_TEST_DIE_AT", "KISSE_TEST_DIE_ON_HIT"
DEATH_STATUS = 137


def arm_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """Arm the point named by KISSE_TEST_DIE_AT, if any; return its name."""
    point = environ.get(DIE_AT, "").strip()
    if not point:
        return None
    on_hit = int(environ.get(DIE_ON_HIT, "1"))
    if on_hit < 1:
        raise SystemExit(f"{DIE_ON_HIT} must be at least 1, got {on_hit}")
    hits = 0

    def die() -> None:
        nonlocal hits
        hits += 1
        if hits >= on_hit:
            os.write(2, f"faulty_kisse: dying at {point} (hit {hits})\n".encode())
            os._exit(DEATH_STATUS)

    faults.arm(point, die)
    return point


def main() -> int:
    arm_from_env()
    from kisse.__main__ import main as kisse_main  # after arming: nothing may run before the point is set
    return kisse_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
