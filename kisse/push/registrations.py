"""`PUT /api/push`, `DELETE /api/push`, `GET /api/push/vapid`: a device tells the
server how its platform's push service reaches it."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kisse.errors import BadRequest, Conflict, NotFound, Unauthorized
from kisse.push import egress, webpush
from kisse.runtime import Runtime

if TYPE_CHECKING:
    from kisse.sessions import Identity

HEX_TOKEN = re.compile(r"[0-9a-fA-F]{32,512}")  # APNs device tokens: hex (32 bytes today)


def _internal(host: str) -> bool:
    """An address (not a name) on a loopback, private, link-local or reserved network."""
    try:
        return not egress.public_address(host)
    except ValueError:
        return host.lower() in ("localhost", "localhost.localdomain")


def _registration(rt: Runtime, body: dict[str, Any]) -> dict[str, Any]:
    """The record kept for the device: only what its provider needs."""
    provider = body["provider"]
    if provider not in rt.push.providers:
        raise Conflict(f"this server does not push through {provider} (GET /api/capabilities: features.push)",
                       code="push_provider_off", details={"provider": provider})
    if provider in ("fcm", "apns") and not body.get("token"):
        raise BadRequest(f"{provider}: give the device's token", code="missing_fields", details={"fields": ["token"]})
    if provider == "fcm":
        return {"provider": "fcm", "token": body["token"]}
    if provider == "apns":
        for field in ("token", "voip_token"):
            if body.get(field) is not None and not HEX_TOKEN.fullmatch(body[field]):
                raise BadRequest(f"{field}: an APNs token is hex", code="invalid_field", details={"field": field})
        return {"provider": "apns", "token": body["token"],
                **({"voip_token": body["voip_token"]} if body.get("voip_token") else {})}
    # Web Push (RFC 8030/8291; UnifiedPush distributors too): the subscription.
    if not body.get("endpoint") or not body.get("keys"):
        raise BadRequest("webpush: give the subscription's endpoint and keys", code="missing_fields",
                         details={"fields": ["endpoint", "keys"]})
    registration = {"provider": "webpush", "endpoint": body["endpoint"],
                    "keys": {"p256dh": body["keys"]["p256dh"], "auth": body["keys"]["auth"]}}
    try:
        webpush.parse_subscription(registration, env=rt.settings.env)  # a key that is a P-256 point, a real URL
        url = urlsplit(body["endpoint"])
        url.port  # noqa: B018 - raises for a port out of range
    except ValueError as error:
        field = str(error).split(":", 1)[0] if ":" in str(error) else "endpoint"
        raise BadRequest(f"webpush: {error}", code="invalid_field", details={"field": field}) from None
    if not url.hostname:
        raise BadRequest("endpoint: must be an https:// URL", code="invalid_field", details={"field": "endpoint"})
    if rt.settings.env == "production" and _internal(url.hostname):
        # The server POSTs to this URL: never to its own network (a name is checked when
        # connecting, kisse/push/egress.py).
        raise BadRequest("endpoint: must be a public push service", code="invalid_field",
                         details={"field": "endpoint"})
    return registration


async def register(rt: Runtime, me: "Identity", body: dict[str, Any]) -> None:
    """The calling device's registration (a new one replaces the old)."""
    if not await rt.storage.set_push(me.session_id, _registration(rt, body)):
        raise Unauthorized("this device was signed out: log in again", code="session_revoked")
    rt.push.changed([me.user_id])


async def unregister(rt: Runtime, me: "Identity") -> None:
    await rt.storage.set_push(me.session_id, None)
    rt.push.changed([me.user_id])


def vapid_key(rt: Runtime) -> dict[str, str]:
    """The application server key Web Push and UnifiedPush clients subscribe with."""
    webpush = rt.push.providers.get("webpush")
    if webpush is None:
        raise NotFound("this server does not push through Web Push", code="push_provider_off")
    return {"public_key": webpush.application_server_key()}  # type: ignore[attr-defined]
