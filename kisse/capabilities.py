"""What this server allows and expects, for clients to adapt to instead of hard-coding."""
from __future__ import annotations

from typing import Any

from config.settings import Settings
from kisse import __version__, protocol, schemas
from kisse.validation import MAX_PROPERTIES

# Bumped only for a change an existing client would break on; additions never bump it
# (docs/API.md, "Evolving the API").
API_VERSION = 1


def capabilities(settings: Settings, push: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """`push`: the push providers this server has credentials for (kisse/push)."""
    return {
        "version": __version__,
        "api_version": API_VERSION,
        "limits": {
            "max_body_bytes": settings.max_body,
            "max_inline_ciphertext_bytes": settings.max_inline_ciphertext,
            "max_blob_bytes": settings.max_blob,
            "max_ws_frame_bytes": settings.max_ws_frame,
            "max_signal_bytes": settings.max_signal,
            "max_group_members": settings.max_group_members,
            "max_devices": settings.max_devices,
            "max_prekeys_per_request": schemas.MAX_PREKEYS_PER_REQUEST,
            "max_prekeys_per_device": settings.prekey_max,
            "prekey_low": settings.prekey_low,
            "max_id_length": schemas.ID["maxLength"],
            "max_properties": MAX_PROPERTIES,
            "message_ttl_min_seconds": settings.min_message_ttl,
            "message_ttl_max_seconds": schemas.MESSAGE_TTL_MAX,
            "ws_queue_bytes": settings.ws_queue_bytes,
            "ws_requests_waiting": protocol.MAX_WAITING_REQUESTS,
        },
        "timers": {
            "ws_ping_seconds": settings.ws_ping,
            "presence_grace_seconds": settings.presence_grace,
            "typing_timeout_seconds": settings.typing_timeout,
            "call_ring_timeout_seconds": settings.call_ring_timeout,
            "access_token_ttl_seconds": settings.access_ttl,
            "refresh_token_ttl_seconds": settings.refresh_ttl,
            "retention_days": settings.retention_days,
            "last_seen_precision_seconds": settings.last_seen_precision,
        },
        "features": {
            "turn": bool(settings.turn_secret),
            "key_directory": True,
            "push": sorted(push),
        },
    }
