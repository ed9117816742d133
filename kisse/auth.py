"""Accounts and tokens: bcrypt off the event loop, HS256 JWTs with pinned algorithms."""
from __future__ import annotations

import asyncio
import re
import secrets
from datetime import datetime, timedelta, timezone
from typing import Any

import bcrypt
import jwt

from kisse.errors import BadRequest, Conflict, Unauthorized
from kisse.runtime import Runtime
from kisse.views import iso, user_view
from storage.base import Record, UsernameTaken

# ASCII only, matched whole: `$` would accept a final newline, and IGNORECASE
# would fold lookalikes (U+212A KELVIN SIGN is "k") into someone else's name.
USERNAME_RE = re.compile(r"[a-z0-9_.\-]{3,32}")
MIN_PASSWORD = 8
# bcrypt reads at most 72 bytes (bcrypt 5 raises past that). We refuse longer
# passwords with a clear 400 instead of truncating them silently.
MAX_PASSWORD_BYTES = 72
JWT_ALGORITHM = "HS256"
INVALID_LOGIN = "invalid username or password"


async def hash_password(rt: Runtime, password: str) -> str:
    rounds = rt.settings.bcrypt_rounds
    hashed = await asyncio.get_running_loop().run_in_executor(
        None, lambda: bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)))
    return hashed.decode()


async def verify_password(password: str, password_hash: str) -> bool:
    return await asyncio.get_running_loop().run_in_executor(
        None, bcrypt.checkpw, password.encode(), password_hash.encode())


async def prepare(rt: Runtime) -> None:
    """At start-up: the hash unknown users are verified against, so that the very
    first login for an unknown user costs one bcrypt like every other."""
    rt.dummy_hash = await hash_password(rt, secrets.token_urlsafe(16))


def canonical_username(username: str) -> str | None:
    """The stored form of a username (lower-case ASCII), or None if it can't be one."""
    lowered = username.lower() if username.isascii() else ""
    return lowered if USERNAME_RE.fullmatch(lowered) else None


def validate_credentials(username: str, password: str) -> str:
    """The canonical username, once both are acceptable for a new account."""
    canonical = canonical_username(username)
    if canonical is None:
        raise BadRequest("username must be 3-32 characters of a-z, 0-9, '_', '.', '-' (ASCII; "
                         "upper case is stored lower-cased)", code="invalid_username")
    if len(password) < MIN_PASSWORD:
        raise BadRequest(f"password must be at least {MIN_PASSWORD} characters", code="weak_password")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise BadRequest(f"password must be at most {MAX_PASSWORD_BYTES} bytes in UTF-8",
                         code="password_too_long")
    return canonical


def issue_token(rt: Runtime, user: Record) -> dict[str, Any]:
    """The login/register response: a fresh token and the user."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    expires = now + timedelta(seconds=rt.settings.jwt_ttl)
    claims = {"sub": user["id"], "iat": now, "exp": expires, "jti": secrets.token_hex(16)}
    token = jwt.encode(claims, rt.settings.jwt_secret, algorithm=JWT_ALGORITHM)
    return {"token": token, "token_type": "Bearer", "expires_at": iso(expires), "user": user_view(user)}


def decode_token(rt: Runtime, token: str) -> dict[str, Any]:
    """Verified claims, or `Unauthorized` for a forged, expired or incomplete token."""
    try:
        return jwt.decode(token, rt.settings.jwt_secret, algorithms=[JWT_ALGORITHM],
                          options={"require": ["sub", "iat", "exp", "jti"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired", code="token_expired") from None
    except jwt.PyJWTError:
        raise Unauthorized("invalid token", code="invalid_token") from None


async def authenticate(rt: Runtime, token: str | None) -> tuple[Record, dict[str, Any]]:
    """The user a token names and its claims; `Unauthorized` otherwise."""
    if not token:
        raise Unauthorized("missing bearer token", code="missing_token")
    claims = decode_token(rt, token)
    user = await rt.storage.get_user(str(claims["sub"]))
    if user is None:
        raise Unauthorized("invalid token", code="invalid_token")
    return user, claims


async def register(rt: Runtime, username: str, password: str, display_name: str | None) -> dict[str, Any]:
    canonical = validate_credentials(username, password)
    if await rt.storage.get_credentials(canonical) is not None:
        raise Conflict("username is taken", code="username_taken")
    password_hash = await hash_password(rt, password)
    display = (display_name or "").strip() or username  # as typed: "Alice" shows as Alice
    try:
        user = await rt.storage.create_user(canonical, password_hash, display)
    except UsernameTaken:
        raise Conflict("username is taken", code="username_taken") from None
    return issue_token(rt, user)


async def login(rt: Runtime, username: str, password: str) -> dict[str, Any]:
    canonical = canonical_username(username)
    found = await rt.storage.get_credentials(canonical) if canonical else None
    # Always run one bcrypt verify, so timing does not reveal whether the user exists.
    assert rt.dummy_hash is not None, "auth.prepare() runs at start-up"
    password_hash = found[1] if found else rt.dummy_hash
    # An over-long password can't match (register refuses them); verify a stand-in
    # so bcrypt 5 doesn't raise and the timing stays the same.
    too_long = len(password.encode()) > MAX_PASSWORD_BYTES
    ok = await verify_password("-" if too_long else password, password_hash)
    if found is None or not ok or too_long:
        raise Unauthorized(INVALID_LOGIN, code="invalid_credentials")
    return issue_token(rt, found[0])

