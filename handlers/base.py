"""`APIHandler`: JSON in and out, bearer auth in `prepare()`, errors as JSON."""
from __future__ import annotations

import logging
from typing import Any

import orjson
import tornado.httputil
import tornado.web
from tornado.httputil import HTTPServerRequest
from tornado.iostream import StreamClosedError

from config.settings import Settings
from kisse import sessions
from kisse.addresses import client_ip
from kisse.sessions import Identity
from kisse.errors import KisseError, NotFound, PayloadTooLarge, client_error
from kisse.hub import Hub
from kisse.logs import new_request_id
from kisse.runtime import Runtime
from kisse.validation import Schema, parse_json, validate
from storage.base import Storage

log = logging.getLogger("kisse.http")
BODY_SLACK = 1024 * 1024


@tornado.web.stream_request_body
class APIHandler(tornado.web.RequestHandler):
    """Base of every REST handler.

    Bodies are streamed so the size limit is enforced while reading (413 JSON)
    instead of Tornado buffering them first. Subclasses set `auth_required`.
    """

    auth_required = True
    # The JSON body schema of each method that reads one (kisse/schemas.py); docs/openapi.yaml
    # documents the same schema for the route (tests/test_specs.py checks).
    BODIES: dict[str, Schema] = {}
    identity: Identity | None = None
    client_gone = False  # the client closed the connection before the answer

    def initialize(self) -> None:
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._body_too_large = False

    # -- typed access to the runtime ---------------------------------------
    @property
    def rt(self) -> Runtime:
        return self.application.settings["kisse"]

    @property
    def storage(self) -> Storage:
        return self.rt.storage

    @property
    def hub(self) -> Hub:
        return self.rt.hub

    @property
    def kisse_settings(self) -> Settings:
        return self.rt.settings

    @property
    def client_ip(self) -> str:
        return client_ip(self.request, self.rt.settings.trusted_proxies)

    @property
    def me(self) -> Identity:
        assert self.identity is not None, "auth_required handlers only"
        return self.identity

    @property
    def user_id(self) -> str:
        return self.me.user_id

    # -- request lifecycle -------------------------------------------------
    def set_default_headers(self) -> None:
        secure_headers(self)

    def body_limit(self) -> int:
        return self.kisse_settings.max_body

    async def prepare(self) -> None:
        self.set_header("X-Request-ID", new_request_id(self.request.headers.get("X-Request-ID")))
        self.rt.inflight += 1
        self._counted = True
        # The server's own cap is the JSON limit; handlers with a larger limit
        # (content uploads) raise it for their request. Slack lets a chunked body
        # just over the limit still get our 413 instead of a dropped connection.
        self.request.connection.set_max_body_size(self.body_limit() + BODY_SLACK)
        declared = self.declared_length()
        if declared is not None and declared > self.body_limit():
            raise PayloadTooLarge(f"request body is larger than {self.body_limit()} bytes")
        if self.auth_required:
            self.identity = await sessions.authenticate(self.rt, bearer_token(self.request))

    def declared_length(self) -> int | None:
        """The request's Content-Length, if it is a plain number (Tornado refuses others)."""
        declared = self.request.headers.get("Content-Length", "")
        # isdigit() alone takes "²"; int() refuses thousands of digits.
        if not (declared.isascii() and declared.isdigit()):
            return None
        return int(declared) if len(declared) <= 18 else 2**63

    def data_received(self, chunk: bytes) -> Any:
        self._body_size += len(chunk)
        if self._body_size > self.body_limit():
            self._body_too_large = True
            self._chunks.clear()
        elif not self._body_too_large:
            self._chunks.append(chunk)
        return None

    def json_body(self) -> dict[str, Any]:
        """The request body parsed as JSON and validated against `BODIES[method]`."""
        if self._body_too_large:
            raise PayloadTooLarge(f"request body is larger than {self.body_limit()} bytes")
        raw = b"".join(self._chunks)
        try:
            document = parse_json(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            raise KisseError("request body is not valid JSON", code="malformed_json") from None
        if document is None:
            document = {}
        return validate(document, self.BODIES[self.request.method or ""], "body")

    def query_int(self, name: str, default: int | None, minimum: int = 0,
                  maximum: int | None = None) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        if maximum is None:
            maximum = 2**63 - 1  # what every backend can store and compare
        try:
            value = int(raw) if raw.isascii() and len(raw) <= 20 else None
        except ValueError:
            value = None
        if value is None:
            raise KisseError(f"{name} must be an integer", code="invalid_query")
        if not minimum <= value <= maximum:
            raise KisseError(f"{name} must be between {minimum} and {maximum}", code="invalid_query")
        return value

    def on_finish(self) -> None:
        self._done()

    def on_connection_close(self) -> None:
        self.client_gone = True
        cut_mid_body = not self.request._body_future.done()
        # Tornado's own fails the pending body read, so a handler whose client
        # left mid-body ends now instead of waiting (with its partial body) forever.
        super().on_connection_close()
        if cut_mid_body:
            # Tornado then drops the handler without finish(), which is what breaks
            # its reference cycle (handler <-> self.ui): do both here, and let go of
            # the partial body now rather than at the next full collection.
            self._chunks.clear()
            self._break_cycles()
            self._done()

    def _done(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.rt.inflight -= 1

    # -- responses ---------------------------------------------------------
    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(orjson.dumps(data))

    def send_empty(self) -> None:
        """204 No Content."""
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        render_error(self, status_code, kwargs.get("exc_info"), self.storage)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Client errors and clients that left are expected; only real faults get a traceback.
        if isinstance(value, (KisseError, tornado.web.HTTPError, StreamClosedError)) or \
                isinstance(value, self.storage.unavailable_errors):
            return
        super().log_exception(typ, value, tb)


def render_error(handler: tornado.web.RequestHandler, status_code: int, exc_info: Any,
                 storage: Storage) -> None:
    """Finish `handler` with `{"error": {code, message}}` and the right status."""
    error = client_error(exc_info[1] if exc_info else None, storage.unavailable_errors, status_code)
    handler.set_status(error.status)
    if error.status == 401:
        handler.set_header("WWW-Authenticate", 'Bearer realm="kisse"')
    if error.details and "retry_after" in error.details:
        handler.set_header("Retry-After", str(error.details["retry_after"]))
    handler.set_header("Content-Type", "application/json; charset=UTF-8")
    handler.finish(orjson.dumps({"error": error.to_dict()}))


class NotFoundHandler(APIHandler):
    """Any unknown route: 404 JSON (no auth needed to learn that)."""

    auth_required = False

    async def prepare(self) -> None:
        raise NotFound("no such route", code="route_not_found")


def secure_headers(handler: tornado.web.RequestHandler) -> None:
    """On every answer: no version banner, no MIME sniffing, and nothing cached
    (answers are private and some carry tokens; content downloads relax this)."""
    handler.clear_header("Server")
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Cache-Control", "no-store")


def bearer_token(request: HTTPServerRequest) -> str | None:
    """The token of an `Authorization: Bearer …` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None

