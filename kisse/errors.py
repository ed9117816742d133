"""Project errors. Services raise them; REST renders `{"error": {code, message}}`
with `status`, and the WebSocket sends the same code in an `error` frame."""
from __future__ import annotations

from typing import Any

import tornado.httputil
import tornado.web


class KisseError(Exception):
    """An error a client may see: HTTP status, snake_case code, readable message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(KisseError):
    status, code = 400, "bad_request"


class Unauthorized(KisseError):
    status, code = 401, "unauthorized"


class Forbidden(KisseError):
    status, code = 403, "forbidden"


class NotFound(KisseError):
    status, code = 404, "not_found"


class Conflict(KisseError):
    status, code = 409, "conflict"


class PayloadTooLarge(KisseError):
    status, code = 413, "payload_too_large"


class RateLimited(KisseError):
    """A limit is reached: `details.retry_after` (seconds, also the Retry-After header)."""

    status, code = 429, "rate_limited"


class RangeNotSatisfiable(KisseError):
    status, code = 416, "range_not_satisfiable"


class Unavailable(KisseError):
    status, code = 503, "storage_unavailable"


def excerpt(value: Any, limit: int = 32) -> str:
    """A short rendering of a client-sent value for a message: never the whole of it."""
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text if len(text) <= limit else text[:limit] + "…")


# Storage that is down answers within seconds, with this advice; a send may have
# been stored before it failed, so it is retried with the same client_message_id.
RETRY_AFTER = 1
RETRY_MESSAGE = ("storage is unavailable; retry the same request with backoff "
                 "(a send with the same client_message_id: it may have been stored)")
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 503: "storage_unavailable"}


def client_error(exc: BaseException | None, unavailable: tuple[type[BaseException], ...],
                 status_code: int = 500) -> KisseError:
    """Whatever went wrong, as the error a client may see (REST and WebSocket alike)."""
    if isinstance(exc, KisseError):
        return exc
    if exc is not None and isinstance(exc, unavailable):
        return Unavailable(RETRY_MESSAGE, details={"retry_after": RETRY_AFTER})
    if isinstance(exc, tornado.web.HTTPError) and exc.status_code < 500:
        if exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        else:
            message = (exc.reason or tornado.httputil.responses.get(exc.status_code, "error")).lower()
        return KisseError(message, code=_HTTP_CODES.get(exc.status_code, "http_error"), status=exc.status_code)
    if status_code < 500:
        return KisseError(tornado.httputil.responses.get(status_code, "error").lower(),
                          code=_HTTP_CODES.get(status_code, "http_error"), status=status_code)
    return KisseError("internal server error", code="internal_error", status=500)
