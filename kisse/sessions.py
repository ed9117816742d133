"""Device sessions: short-lived access tokens, rotating refresh tokens, revocation.

Every login makes a device with one session. The access token is an HS256
JWT (`sub`, `did`, `sid`, `iat`, `exp`, `jti`) that lives `KISSE_ACCESS_TTL`;
each request checks that its session still exists, so revocation takes effect
at once. The refresh token is 32 random bytes the server keeps only as a
SHA-256 hash; it lives `KISSE_REFRESH_TTL`, renewed on every use, and every
use spends it for a new one (OAuth 2.1 rotation). A spent token presented
again was copied: the device's session is revoked (reuse detection) - unless
it comes within `KISSE_REFRESH_RACE_GRACE` of its rotation, which is one app
racing itself, answered 409 without revoking anything.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import jwt

from kisse import keys, protocol
from kisse.errors import Conflict, NotFound, Unauthorized
from kisse.runtime import Runtime
from kisse.views import device_view, iso, user_view
from storage.base import Record, TooManyDevices, utcnow

JWT_ALGORITHM = "HS256"
# last_seen_at is written at most this often, not on every request.
TOUCH_EVERY = timedelta(minutes=1)
DEFAULT_DEVICE_NAME = "Unnamed device"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is: a user, on one of their devices, in its session."""

    user_id: str
    device_id: int
    session_id: str


def _hash(refresh_token: str) -> str:
    return hashlib.sha256(refresh_token.encode()).hexdigest()


def _new_refresh(rt: Runtime) -> tuple[str, str, datetime]:
    token = secrets.token_urlsafe(32)
    return token, _hash(token), utcnow() + timedelta(seconds=rt.settings.refresh_ttl)


def _answer(rt: Runtime, user: Record, device: Record, refresh_token: str, refresh_expires_at: datetime,
            ) -> dict[str, Any]:
    """The login shape: a fresh access token, the refresh token, the device, the user."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    expires = now + timedelta(seconds=rt.settings.access_ttl)
    claims = {"sub": user["id"], "did": device["device_id"], "sid": device["session_id"], "iat": now,
              "exp": expires, "jti": secrets.token_hex(16)}
    return {"token": jwt.encode(claims, rt.settings.jwt_secret, algorithm=JWT_ALGORITHM),
            "token_type": "Bearer", "expires_at": iso(expires),
            "refresh_token": refresh_token, "refresh_expires_at": iso(refresh_expires_at),
            "device": device_view(device), "user": user_view(user)}


async def open_session(rt: Runtime, user: Record, device_name: str | None,
                       replace_device_id: int | None = None) -> dict[str, Any]:
    """A new device for a user who just proved who they are (with their password:
    so, at the device cap, they may name a device to sign out in its place)."""
    token, token_hash, expires = _new_refresh(rt)
    name = (device_name or "").strip() or DEFAULT_DEVICE_NAME
    try:
        device = await rt.storage.create_device(user["id"], name, token_hash, expires, rt.settings.max_devices)
    except TooManyDevices as full:
        if replace_device_id is None or replace_device_id not in {d["device_id"] for d in full.devices}:
            raise Conflict(f"this account already has {len(full.devices)} devices: remove one first, or "
                           "log in again with replace_device_id", code="too_many_devices",
                           details={"devices": [device_view(d) for d in full.devices]}) from None
        await revoke(rt, user["id"], device_id=replace_device_id)
        return await open_session(rt, user, device_name)
    return _answer(rt, user, device, token, expires)


def decode_access(rt: Runtime, token: str) -> dict[str, Any]:
    """Verified claims, or `Unauthorized` for a forged, expired or incomplete token."""
    try:
        return jwt.decode(token, rt.settings.jwt_secret, algorithms=[JWT_ALGORITHM],
                          options={"require": ["sub", "did", "sid", "iat", "exp", "jti"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired: refresh it", code="token_expired") from None
    except jwt.PyJWTError:
        raise Unauthorized("invalid token", code="invalid_token") from None


async def authenticate(rt: Runtime, token: str | None) -> Identity:
    """The identity an access token names, if its session is still live."""
    if not token:
        raise Unauthorized("missing bearer token", code="missing_token")
    claims = decode_access(rt, token)
    session = await rt.storage.get_session(str(claims["sid"]))
    if session is None or session["user_id"] != claims["sub"] or session["device_id"] != claims["did"]:
        raise Unauthorized("this device was signed out: log in again", code="session_revoked")
    now = utcnow()
    if now - session["last_seen_at"] >= TOUCH_EVERY:
        rt.tasks.spawn(rt.storage.touch_device(session["session_id"], now), "device last seen")
    return Identity(session["user_id"], session["device_id"], session["session_id"])


async def refresh(rt: Runtime, refresh_token: str) -> dict[str, Any]:
    """Spend a refresh token for new tokens (at most KISSE_LIMIT_REFRESH times per device)."""
    presented = _hash(refresh_token)
    current = await rt.storage.session_of_refresh(presented)
    if current is not None:  # refused before anything is spent: the token stays good
        await rt.limits.hit("refresh", current["session_id"])
    token, token_hash, expires = _new_refresh(rt)
    now = utcnow()
    state, device = await rt.storage.rotate_refresh(presented, token_hash, expires, now)
    if state == "rotated":
        assert device is not None
        user = await rt.storage.get_user(device["user_id"])
        if user is None:
            raise Unauthorized("invalid refresh token", code="invalid_refresh_token")
        return _answer(rt, user, device, token, expires)
    if state == "spent":
        assert device is not None
        if device["rotated_at"] and now - device["rotated_at"] <= timedelta(seconds=rt.settings.refresh_race_grace):
            raise Conflict("this refresh token was spent moments ago by a concurrent refresh: use the tokens "
                           "it got (refresh one request at a time)", code="refresh_race")
        await revoke(rt, device["user_id"], device_id=device["device_id"])
        raise Unauthorized("this refresh token was used before, so it was copied: the device is signed out "
                           "and must log in again", code="refresh_token_reused")
    if state == "expired":
        raise Unauthorized("refresh token expired: log in again", code="refresh_token_expired")
    raise Unauthorized("invalid refresh token", code="invalid_refresh_token")


async def renew(rt: Runtime, identity: Identity) -> dict[str, Any]:
    """New tokens for the calling device (after a password change)."""
    token, token_hash, expires = _new_refresh(rt)
    device = await rt.storage.renew_session(identity.session_id, token_hash, expires)
    user = await rt.storage.get_user(identity.user_id)
    if device is None or user is None:
        raise Unauthorized("this device was signed out: log in again", code="session_revoked")
    return _answer(rt, user, device, token, expires)


async def revoke(rt: Runtime, user_id: str, device_id: int | None = None,
                 keep_session: str | None = None) -> list[Record]:
    """Sign devices out: their tokens stop working now, their WebSockets close with 4003,
    and they leave the key directory (`device.removed` to contacts)."""
    gone = await rt.storage.revoke_devices(user_id, device_id=device_id, keep_session=keep_session)
    if gone:
        rt.bus.revoke_sessions(user_id, {d["session_id"] for d in gone}, protocol.CLOSE_REVOKED, "device signed out")
        await keys.device_removed(rt, user_id, [d["device_id"] for d in gone])
        rt.push.changed([user_id])  # their push registrations went with them
    return gone


async def list_devices(rt: Runtime, identity: Identity) -> dict[str, Any]:
    return {"devices": [{**device_view(d), "current": d["session_id"] == identity.session_id}
                        for d in await rt.storage.list_devices(identity.user_id)]}


async def remove_device(rt: Runtime, identity: Identity, device_id: int) -> None:
    if not await revoke(rt, identity.user_id, device_id=device_id):
        raise NotFound("no such device", code="device_not_found")
