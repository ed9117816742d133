"""`python -m kisse`: serve Kisse. Options come from KISSE_* variables or flags."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from urllib.parse import urlsplit, urlunsplit

from config.settings import OPTIONS, Settings, SettingsError
from handlers.base import BODY_SLACK
from kisse.app import make_app, runtime, shutdown, startup
from kisse.listener import GuardedHTTPServer, raise_descriptor_limit
from kisse.logs import setup_logging
from kisse.tasks import Background
from storage import create_storage

log = logging.getLogger("kisse")
# Young-generation collections every 20k allocations instead of 700: relaying a
# message allocates many short-lived objects, and the default threshold ran a
# collection every few messages (measured: -15 % server CPU per relayed message
# with 50 pairs, see benchmarks/README.md). The older generations then run so
# rarely that garbage in reference cycles (a closed connection, an aborted
# request) could wait for hours, so a full collection also runs every
# KISSE_GC_INTERVAL seconds (about 0.3 µs per live object: 35 ms for the memory
# backend holding 100k messages).
GC_THRESHOLDS = (20_000, 10, 10)


def parse_args(argv: list[str]) -> dict[str, str]:
    """Flags mirror the KISSE_* variables; a flag wins over the variable."""
    parser = argparse.ArgumentParser(
        prog="python -m kisse",
        description="Kisse: a zero-knowledge gateway for end-to-end-encrypted messaging. "
                    "Every option can also be set by its environment variable.")
    for option in OPTIONS:
        flag = "--" + option.field.replace("_", "-")
        default = ",".join(option.default) if isinstance(option.default, tuple) else option.default
        parser.add_argument(flag, dest=option.env, metavar=option.env,
                            help=f"{option.help} (env {option.env}, default {default!r})")
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


class StartupError(Exception):
    """The server cannot start; the message says which setting to look at."""


async def serve(settings: Settings) -> None:
    soft_before, soft = raise_descriptor_limit()
    storage = create_storage(settings.storage)
    app = make_app(settings, storage)
    try:
        await startup(app)
    except storage.unavailable_errors as error:
        await storage.close()
        raise StartupError(f"KISSE_STORAGE: cannot reach {redact(settings.storage)} "
                           f"({type(error).__name__}); is the database running?") from None
    server = GuardedHTTPServer(app, xheaders=False, max_body_size=settings.max_body + BODY_SLACK,
                               header_timeout=settings.header_timeout, idle_timeout=settings.idle_timeout,
                               body_timeout=settings.body_timeout, body_min_rate=settings.body_min_rate,
                               fd_reserve=settings.fd_reserve)
    server.listen(settings.port, settings.host)
    runtime(app).metrics.listener_stats = lambda: {"refused": server.refused_total, "cut": server.cut_total}
    log.info("file descriptors", extra={"limit": soft, "raised_from": soft_before,
                                        "refuse_connections_from": server.descriptors.mark})
    log.info("kisse listening", extra={"host": settings.host, "port": settings.port,
                                       "storage": settings.storage.split("://")[0]})
    process = Background()
    if settings.gc_interval > 0:
        process.every(settings.gc_interval, collect_garbage, "garbage collection", first_after=settings.gc_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()  # stop accepting; open connections finish below
    await process.close()
    await shutdown(app)
    await asyncio.wait_for(server.close_all_connections(), 5)


async def collect_garbage() -> None:
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env({**os.environ, **overrides})
    except SettingsError as error:
        print(f"kisse: configuration error: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if settings.jwt_secret_generated:
        log.warning("KISSE_JWT_SECRET is not set: using a random secret, tokens won't survive a restart")
    gc.freeze()  # what start-up loaded (modules, settings) is never garbage: don't rescan it
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        print(f"kisse: {error}", file=sys.stderr)
        return 1
    return 0


def redact(url: str) -> str:
    """A storage URL without its password, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


if __name__ == "__main__":
    sys.exit(main())
