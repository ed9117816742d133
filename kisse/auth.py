"""Accounts: credentials, bcrypt off the event loop, password changes and deletion (tokens: kisse/sessions.py)."""
from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import bcrypt

from kisse import protocol, sessions
from kisse.errors import BadRequest, Conflict, Unauthorized
from kisse.runtime import Runtime
from storage.base import Record, UsernameTaken

# ASCII only, matched whole: `$` would accept a final newline, and IGNORECASE
# would fold lookalikes (U+212A KELVIN SIGN is "k") into someone else's name.
USERNAME_RE = re.compile(r"[a-z0-9_.\-]{3,32}")
MIN_PASSWORD = 8
# bcrypt reads at most 72 bytes (bcrypt 5 raises past that). We refuse longer
# passwords with a clear 400 instead of truncating them silently.
MAX_PASSWORD_BYTES = 72
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


async def register(rt: Runtime, username: str, password: str, display_name: str | None,
                   device_name: str | None = None, client: str = "") -> dict[str, Any]:
    await rt.limits.hit("register_ip", client)
    canonical = validate_credentials(username, password)
    if await rt.storage.get_credentials(canonical) is not None:
        raise Conflict("username is taken", code="username_taken")
    password_hash = await hash_password(rt, password)
    display = (display_name or "").strip() or username  # as typed: "Alice" shows as Alice
    try:
        user = await rt.storage.create_user(canonical, password_hash, display)
    except UsernameTaken:
        raise Conflict("username is taken", code="username_taken") from None
    return await sessions.open_session(rt, user, device_name)


async def _check_password(rt: Runtime, found: tuple[Record, str] | None, password: str) -> Record:
    """The user if `password` is theirs; one bcrypt verification either way, so
    the time taken does not tell whether the account exists."""
    assert rt.dummy_hash is not None, "auth.prepare() runs at start-up"
    password_hash = found[1] if found else rt.dummy_hash
    # An over-long password can't match (register refuses them); verify a stand-in
    # so bcrypt 5 doesn't raise and the timing stays the same.
    too_long = len(password.encode()) > MAX_PASSWORD_BYTES
    ok = await verify_password("-" if too_long else password, password_hash)
    if found is None or not ok or too_long:
        raise Unauthorized(INVALID_LOGIN, code="invalid_credentials")
    return found[0]


async def login(rt: Runtime, username: str, password: str, device_name: str | None = None,
                replace_device_id: int | None = None, client: str = "") -> dict[str, Any]:
    """A new device for the right password. Failures count per client address and per
    username: past either limit the answer is 429, before any bcrypt, even to the
    right password (docs/SECURITY.md: why a victim's account is not locked for long)."""
    canonical = canonical_username(username)
    account = canonical or username.lower()
    await rt.limits.check("login_ip", client)
    await rt.limits.check("login_user", account)
    found = await rt.storage.get_credentials(canonical) if canonical else None
    try:
        user = await _check_password(rt, found, password)
    except Unauthorized:
        await rt.limits.spend(("login_ip", (client,)), ("login_user", (account,)))
        raise
    return await sessions.open_session(rt, user, device_name, replace_device_id)


async def _own_credentials(rt: Runtime, identity: sessions.Identity) -> tuple[Record, str] | None:
    user = await rt.storage.get_user(identity.user_id)
    return await rt.storage.get_credentials(user["username"]) if user else None


async def change_password(rt: Runtime, identity: sessions.Identity, current: str, new: str) -> dict[str, Any]:
    """Set a new password: every other device is signed out, this one gets fresh tokens."""
    await rt.limits.hit("password", identity.user_id)
    found = await _own_credentials(rt, identity)
    user = await _check_password(rt, found, current)
    validate_credentials(user["username"], new)
    await rt.storage.set_password_hash(user["id"], await hash_password(rt, new))
    await sessions.revoke(rt, user["id"], keep_session=identity.session_id)
    return await sessions.renew(rt, identity)


async def delete_account(rt: Runtime, identity: sessions.Identity, password: str) -> None:
    """Erase the account (storage.base.Storage.delete_user); its contacts hear of it."""
    await rt.limits.hit("password", identity.user_id)  # the password is checked: guesses count
    found = await _own_credentials(rt, identity)
    user = await _check_password(rt, found, password)
    contacts = await rt.storage.contact_ids(user["id"])
    sessions_of = {d["session_id"] for d in await rt.storage.list_devices(user["id"])}
    await rt.storage.delete_user(user["id"])
    rt.push.changed([user["id"]])
    rt.bus.revoke_sessions(user["id"], sessions_of, protocol.CLOSE_REVOKED, "account deleted")
    rt.bus.send(contacts, "user.deleted", {"user_id": user["id"]})
