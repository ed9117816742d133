"""The WebSocket envelope: `{type, id?, data}` both ways.

Clients send requests; each one carrying an `id` gets exactly one reply with
that id: `ack` (with a result) or `error` (with code and message). Events the
server pushes carry no id.
"""
from __future__ import annotations

import orjson
from typing import Any

from kisse.errors import BadRequest, KisseError
from kisse.validation import ID, Schema, obj, validate

# WebSocket close codes (1xxx from RFC 6455, 4xxx ours; listed in asyncapi.yaml).
CLOSE_GOING_AWAY = 1001          # server shutting down
CLOSE_TOO_BIG = 1009             # frame over KISSE_MAX_WS_FRAME (Tornado sends it)
CLOSE_TOKEN_EXPIRED = 4001       # the token used to connect has expired
CLOSE_PING_TIMEOUT = 4002        # the peer answered no ping for two intervals of reading
CLOSE_SLOW_CONSUMER = 4008       # the client stopped reading; its queue overflowed

_CALL = obj({"call_id": ID}, ("call_id",))
_SIGNAL = obj({"call_id": ID, "payload": {}}, ("call_id", "payload"))
_CONVERSATION = obj({"conversation_id": ID}, ("conversation_id",))
_MESSAGE = obj({"message_id": ID}, ("message_id",))

REQUESTS: dict[str, Schema] = {
    "ping": obj({}),
    "sync": obj({"cursors": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                             "maxProperties": 10000}}),
    "message.send": obj({"conversation_id": ID,
                         "client_message_id": {"type": "string", "minLength": 1, "maxLength": 64},
                         "ciphertext": {"type": ["string", "null"]}},
                        ("conversation_id", "client_message_id")),
    "message.delivered": _MESSAGE,
    "message.read": _MESSAGE,
    "typing.start": _CONVERSATION,
    "typing.stop": _CONVERSATION,
    "presence.set": obj({"status": {"enum": ["online", "away", "busy", "offline"]}}, ("status",)),
    "call.start": obj({"callee_id": ID, "media": {"enum": ["audio", "video"]}}, ("callee_id", "media")),
    "call.accept": _CALL,
    "call.reject": _CALL,
    "call.cancel": _CALL,
    "call.end": _CALL,
    "call.offer": _SIGNAL,
    "call.answer": _SIGNAL,
    "call.ice": _SIGNAL,
    "call.hangup": obj({"call_id": ID, "payload": {}}, ("call_id",)),
}

ENVELOPE = {"type": "object", "required": ["type"], "additionalProperties": False,
            "properties": {"type": {"type": "string"},
                           "id": {"type": ["string", "integer"], "maxLength": 64},
                           "data": {"type": "object"}}}


class FrameError(KisseError):
    """A frame we can't act on; carries the request id when we could read it."""

    def __init__(self, message: str, code: str, request_id: Any = None) -> None:
        super().__init__(message, code=code, status=400)
        self.request_id = request_id


def parse(text: str | bytes) -> tuple[str, Any, dict[str, Any]]:
    """`(type, id, data)` of a valid request frame; `FrameError` otherwise."""
    if isinstance(text, bytes):
        raise FrameError("frames must be JSON text, not binary", "binary_frame")
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError("frame is not valid JSON", "malformed_json") from None
    request_id = frame.get("id") if isinstance(frame, dict) else None
    if isinstance(request_id, float):  # 2.0, or an integer too big for 64 bits (orjson reads it as a float)
        raise FrameError("id must be a string or an integer of at most 64 bits", "invalid_field")
    if isinstance(request_id, (dict, list, bool)):
        request_id = None
    try:
        if not _plain_envelope(frame):  # the schema only runs to explain what is wrong
            validate(frame, ENVELOPE)
        kind = frame["type"]
        schema = REQUESTS.get(kind)
        if schema is None:
            raise FrameError(f"unknown frame type {kind!r}", "unknown_type", request_id)
        data = validate(frame.get("data", {}), schema)
    except BadRequest as error:
        raise FrameError(error.message, error.code, request_id) from None
    return kind, request_id, data


def _plain_envelope(frame: Any) -> bool:
    """A cheap exact check of ENVELOPE for the common, valid case (a hot path)."""
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str) or not frame.keys() <= _KEYS:
        return False
    request_id = frame.get("id")
    if "id" in frame and not (
            (isinstance(request_id, str) and len(request_id) <= 64)
            or (isinstance(request_id, int) and not isinstance(request_id, bool))):
        return False
    return isinstance(frame.get("data", {}), dict)


_KEYS = frozenset(ENVELOPE["properties"])


def encode(kind: str, data: dict[str, Any], request_id: Any = None) -> bytes:
    """A frame as compact UTF-8 JSON (orjson: several times faster than `json`, a hot path)."""
    if request_id is None:
        return orjson.dumps({"type": kind, "data": data})
    return orjson.dumps({"type": kind, "id": request_id, "data": data})
