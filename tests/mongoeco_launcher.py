"""Run mongoeco's MongoDB wire server until stopped (test helper, Python >= 3.13).

Run by the interpreter of the mongoeco venv that tests/mongo_server.py builds,
never imported by the test suite itself:

    python tests/mongoeco_launcher.py [--port 0] [--sqlite PATH]

It prints one line `READY <port>` on stdout once it accepts connections, then
serves until SIGTERM/SIGINT or until its stdin closes (so a crashed parent
never leaves it running).
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading

from mongoeco.engines import MemoryEngine, SQLiteEngine
from mongoeco.wire import AsyncMongoEcoProxyServer


async def serve(port: int, sqlite_path: str | None) -> None:
    engine = SQLiteEngine(sqlite_path) if sqlite_path else MemoryEngine()
    server = AsyncMongoEcoProxyServer(engine=engine, host="127.0.0.1", port=port)
    address = await server.start()
    print(f"READY {address.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # stdin reaching EOF means the parent went away. A daemon thread, so
    # interpreter exit never waits for its blocking read.
    threading.Thread(target=_wait_stdin_eof, args=(loop, stop), daemon=True).start()
    await stop.wait()
    await server.close()


def _wait_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    loop.call_soon_threadsafe(stop.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sqlite", default=None, help="database file (default: in-memory engine)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.sqlite))


if __name__ == "__main__":
    main()
