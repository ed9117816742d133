"""Structured JSON logs (python-json-logger), one object per line on stderr,
each carrying the id of the request (or WebSocket frame) it belongs to."""
from __future__ import annotations

import contextvars
import logging
import random
import re
import sys

from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_request_id(offered: str | None = None) -> str:
    """Use the client's `X-Request-ID` when it is sane, else make one; bind it to this task."""
    # Not a secret, so no urandom syscall: this runs for every WebSocket frame.
    rid = offered if offered and _CLIENT_ID_RE.match(offered) else f"{random.getrandbits(64):016x}"
    request_id.set(rid)
    return rid


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def json_formatter() -> JsonFormatter:
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(json_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries()


def quiet_libraries() -> None:
    """Keep libraries that log secrets at DEBUG away from DEBUG, whatever the level:
    Tornado's access log prints query strings (`/ws?token=…`), PyMongo's command
    log prints documents (ciphertext, password hashes), httpx logs every URL at INFO
    (a Web Push endpoint is a capability: whoever has it can push to the device)."""
    for name in ("tornado.access", "pymongo", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
