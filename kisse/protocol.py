"""The WebSocket envelope: `{type, id?, data}` both ways.

Clients send requests; each one carrying an `id` gets exactly one reply with
that id: `ack` (with a result) or `error` (with code and message). Events the
server pushes carry no id.
"""
from __future__ import annotations

from typing import Any

import orjson

from kisse import schemas
from kisse.errors import BadRequest, KisseError, excerpt
from kisse.validation import MAX_PROPERTIES, Schema, obj, parse_json, validate

# WebSocket close codes (1xxx from RFC 6455, 4xxx ours; listed in asyncapi.yaml).
CLOSE_GOING_AWAY = 1001          # server shutting down
CLOSE_INVALID_TEXT = 1007        # a text frame that is not UTF-8
CLOSE_POLICY = 1008              # past twice KISSE_WS_FRAME_RATE: a client that ignores rate_limited
CLOSE_TOO_BIG = 1009             # frame over KISSE_MAX_WS_FRAME (Tornado sends it)
CLOSE_REVOKED = 4003             # the device's session was revoked (logout, removed, password change...)
CLOSE_PING_TIMEOUT = 4002        # the peer answered no ping for two intervals of reading
CLOSE_SLOW_CONSUMER = 4008       # the client stopped reading; its queue overflowed

REQUESTS: dict[str, Schema] = {
    "ping": schemas.EMPTY,
    "sync": schemas.SYNC,
    "message.send": schemas.SEND_MESSAGE,
    "message.delivered": schemas.MESSAGE_REF,
    "message.read": schemas.MESSAGE_REF,
    "typing.start": schemas.CONVERSATION_REF,
    "typing.stop": schemas.CONVERSATION_REF,
    "presence.set": schemas.SET_PRESENCE,
    "call.start": schemas.START_CALL,
    "call.accept": schemas.CALL_REF,
    "call.reject": schemas.CALL_REF,
    "call.cancel": schemas.CALL_REF,
    "call.end": schemas.CALL_REF,
    "call.offer": schemas.SIGNAL,
    "call.answer": schemas.SIGNAL,
    "call.ice": schemas.SIGNAL,
    "call.hangup": schemas.HANGUP,
}
MAX_ID_LENGTH = 64
# Requests a connection may have waiting to be handled; with this many, the
# server stops reading it until they are done (TCP backpressure).
MAX_WAITING_REQUESTS = 16
ENVELOPE = obj({"type": {"type": "string"},
                "id": {"type": ["string", "integer"], "maxLength": MAX_ID_LENGTH,
                       "minimum": -2**63, "maximum": 2**63 - 1},
                "data": {"type": "object"}},
               ("type",))


class FrameError(KisseError):
    """A frame we can't act on; carries the request id when we could read it."""

    def __init__(self, message: str, code: str, request_id: Any = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code, status=400, details=details)
        self.request_id = request_id


def parse(text: str | bytes) -> tuple[str, Any, dict[str, Any]]:
    """`(type, id, data)` of a valid request frame; `FrameError` otherwise.

    Unknown envelope and `data` fields are ignored. An error carries the request
    id only when the id itself is valid, so nothing invalid is echoed back."""
    if isinstance(text, bytes):
        raise FrameError("frames must be JSON text, not binary", "binary_frame")
    try:
        frame = parse_json(text)
    except orjson.JSONDecodeError:
        raise FrameError("frame is not valid JSON", "malformed_json") from None
    request_id = frame.get("id") if isinstance(frame, dict) else None
    if not _valid_id(request_id):
        request_id = None
    try:
        if not _plain_envelope(frame):  # the schema only runs to explain what is wrong
            validate(frame, ENVELOPE, "frame")
            if "id" in frame and request_id is None:  # 2.0, or an integer over 64 bits read as a float
                raise BadRequest("id must be a string or an integer of at most 64 bits",
                                 code="invalid_field", details={"field": "id"})
        kind = frame["type"]
        schema = REQUESTS.get(kind)
        if schema is None:
            raise FrameError(f"unknown frame type {excerpt(kind)}", "unknown_type", request_id)
        data = validate(frame.get("data", {}), schema, "data")
    except BadRequest as error:
        raise FrameError(error.message, error.code, request_id, error.details) from None
    return kind, request_id, data


def _valid_id(request_id: Any) -> bool:
    if isinstance(request_id, str):
        return len(request_id) <= MAX_ID_LENGTH
    return type(request_id) is int and -2**63 <= request_id < 2**63


def _plain_envelope(frame: Any) -> bool:
    """A cheap exact check of ENVELOPE for the common, valid case (a hot path)."""
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str) or len(frame) > MAX_PROPERTIES:
        return False
    if "id" in frame and not _valid_id(frame["id"]):
        return False
    return isinstance(frame.get("data", {}), dict)


def encode(kind: str, data: dict[str, Any], request_id: Any = None) -> bytes:
    """A frame as compact UTF-8 JSON (orjson: several times faster than `json`, a hot path)."""
    if request_id is None:
        return orjson.dumps({"type": kind, "data": data})
    return orjson.dumps({"type": kind, "id": request_id, "data": data})
