"""Project errors. Services raise them; REST renders `{"error": {code, message}}`
with `status`, and the WebSocket sends the same code in an `error` frame."""
from __future__ import annotations

from typing import Any


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


class RangeNotSatisfiable(KisseError):
    status, code = 416, "range_not_satisfiable"


class Unavailable(KisseError):
    status, code = 503, "storage_unavailable"
