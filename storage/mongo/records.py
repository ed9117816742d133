"""Mapping between MongoDB documents and the records `storage.base` speaks.

Documents use `_id` = the 24-hex string from `storage.base.new_id()` (not an
ObjectId) so ids look the same on every backend; records call it `id`.
Internal fields (lower-cased username, password hash, direct-pair key, call
parties) never leave the backend.
"""
from __future__ import annotations

from typing import Any

from storage.base import Record

USER_FIELDS = ("id", "username", "display_name", "created_at", "deleted")
CONVERSATION_FIELDS = ("id", "kind", "participant_ids", "requests", "admins", "former", "title", "created_by",
                       "created_at", "last_activity_at", "last_seq", "last_message", "message_ttl")
MESSAGE_FIELDS = ("id", "conversation_id", "sender_id", "seq", "client_message_id", "created_at", "expires_at",
                  "content", "ciphertext", "blob_id", "tombstone")
CALL_FIELDS = ("id", "caller_id", "callee_id", "media", "status", "created_at", "ring_deadline",
               "answered_at", "ended_at", "end_reason", "ended_by")


def record(doc: dict[str, Any], fields: tuple[str, ...]) -> Record:
    """The public record of a document: `_id` renamed `id`, only `fields` kept."""
    out: Record = {}
    for key in fields:
        value = doc.get("_id") if key == "id" else doc.get(key)
        if isinstance(value, bytes) and not type(value) is bytes:
            value = bytes(value)  # bson.Binary with a subtype: callers expect plain bytes
        out[key] = value
    return out


def user(doc: dict[str, Any]) -> Record:
    out = record(doc, USER_FIELDS)
    out["deleted"] = bool(out["deleted"])  # accounts from before deletion existed have no field
    return out


def conversation(doc: dict[str, Any]) -> Record:
    out = record(doc, CONVERSATION_FIELDS)
    out["pending_seqs"] = sorted(entry["seq"] for entry in doc.get("pending") or ())
    return out


def message(doc: dict[str, Any]) -> Record:
    return record(doc, MESSAGE_FIELDS)


def call(doc: dict[str, Any]) -> Record:
    out = record(doc, CALL_FIELDS)
    # Fields a transition set beyond the known ones round-trip too, as in memory.
    for key, value in doc.items():
        if key not in ("_id", "parties") and key not in out:
            out[key] = value
    return out
