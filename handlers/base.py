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
from kisse import auth
from kisse.errors import KisseError, NotFound, PayloadTooLarge
from kisse.hub import Hub
from kisse.logs import new_request_id
from kisse.runtime import Runtime
from kisse.validation import Schema, validate
from storage.base import Record, Storage

log = logging.getLogger("kisse.http")
BODY_SLACK = 1024 * 1024


@tornado.web.stream_request_body
class APIHandler(tornado.web.RequestHandler):
    """Base of every REST handler.

    Bodies are streamed so the size limit is enforced while reading (413 JSON)
    instead of Tornado buffering them first. Subclasses set `auth_required`.
    """

    auth_required = True
    current_user: Record | None
    client_gone = False  # the client closed the connection before the answer

    def initialize(self) -> None:
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._body_too_large = False
        self.claims: dict[str, Any] = {}

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
    def user_id(self) -> str:
        assert self.current_user is not None
        return self.current_user["id"]

    # -- request lifecycle -------------------------------------------------
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
        declared = self.request.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.body_limit():
            raise PayloadTooLarge(f"request body is larger than {self.body_limit()} bytes")
        self.current_user = None
        if self.auth_required:
            self.current_user, self.claims = await auth.authenticate(self.rt, bearer_token(self.request))

    def data_received(self, chunk: bytes) -> Any:
        self._body_size += len(chunk)
        if self._body_size > self.body_limit():
            self._body_too_large = True
            self._chunks.clear()
        elif not self._body_too_large:
            self._chunks.append(chunk)
        return None

    def json_body(self, schema: Schema) -> dict[str, Any]:
        """The request body parsed as JSON and validated against `schema`."""
        if self._body_too_large:
            raise PayloadTooLarge(f"request body is larger than {self.body_limit()} bytes")
        raw = b"".join(self._chunks)
        try:
            document = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            raise KisseError("request body is not valid JSON", code="malformed_json") from None
        if document is None:
            document = {}
        return validate(document, schema)

    def query_int(self, name: str, default: int | None, minimum: int = 0,
                  maximum: int | None = None) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise KisseError(f"{name} must be an integer", code="invalid_query") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise KisseError(f"{name} must be {bound}", code="invalid_query")
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
    error = _client_error(status_code, exc_info, storage)
    handler.set_status(error.status)
    if error.status == 401:
        handler.set_header("WWW-Authenticate", 'Bearer realm="kisse"')
    handler.set_header("Content-Type", "application/json; charset=UTF-8")
    handler.finish(orjson.dumps({"error": error.to_dict()}))


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 503: "storage_unavailable"}


def _client_error(status_code: int, exc_info: Any, storage: Storage) -> KisseError:
    """Turn whatever went wrong into a KisseError safe to show a client."""
    exc = exc_info[1] if exc_info else None
    if isinstance(exc, KisseError):
        return exc
    if isinstance(exc, storage.unavailable_errors):
        return KisseError("storage is unavailable, retry shortly", code="storage_unavailable", status=503)
    if isinstance(exc, tornado.web.HTTPError) and exc.status_code < 500:
        if exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        else:
            message = (exc.reason or tornado.httputil.responses.get(exc.status_code, "error")).lower()
        return KisseError(message, code=_HTTP_CODES.get(exc.status_code, "http_error"), status=exc.status_code)
    if status_code < 500:
        return KisseError(tornado.httputil.responses.get(status_code, "error"),
                          code=_HTTP_CODES.get(status_code, "http_error"), status=status_code)
    return KisseError("internal server error", code="internal_error", status=500)


class NotFoundHandler(APIHandler):
    """Any unknown route: 404 JSON (no auth needed to learn that)."""

    auth_required = False

    async def prepare(self) -> None:
        raise NotFound("no such route", code="route_not_found")


def bearer_token(request: HTTPServerRequest) -> str | None:
    """The token of an `Authorization: Bearer …` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None

