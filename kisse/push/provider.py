"""What every push provider speaks: a content-free `Wake` in, a `Result` out.

A push says "wake up" and nothing more (docs/SECURITY.md): a type (`wake` for
a message, `call` for an incoming call, `call_end` to stop the ringing) and,
for calls, the opaque call id the phone needs to show the call screen. No
conversation, sender, message id, ciphertext or count ever leaves the server.
"""
from __future__ import annotations

import datetime
import email.utils
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import certifi
import httpx

from config.settings import SettingsError

WakeKind = Literal["wake", "call", "call_end"]
Outcome = Literal["sent", "retry", "dead", "failed"]


@dataclass(frozen=True, slots=True)
class Wake:
    kind: WakeKind
    call_id: str | None = None
    urgent: bool = False   # calls: APNs priority 10 / VoIP, FCM high priority, Web Push Urgency: high
    ttl: int = 3600        # seconds the platform may keep it for a device that is off (calls: the ring timeout)
    collapse: str = "wake"  # the platform keeps only the latest push of one collapse key per device

    def payload(self) -> dict[str, Any]:
        """The whole of what the phone receives."""
        return {"type": self.kind, **({"call_id": self.call_id} if self.call_id else {})}


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    status: int | None = None           # the provider's HTTP status, if it answered
    retry_after: float | None = None    # seconds, from Retry-After (429, 5xx)
    reason: str | None = None           # the provider's error name, never the token


class Provider(Protocol):
    """One push service. `send` never raises for the provider's answers or a timeout:
    it returns `retry` (429, 5xx, timeout, connection refused), `dead` (the
    registration is gone for good: drop it) or `failed` (a 4xx that retrying will
    not mend); `sent` on 2xx."""

    name: str  # "fcm" | "apns" | "webpush"

    async def send(self, registration: dict[str, Any], wake: Wake) -> Result: ...

    async def close(self) -> None: ...


def ssl_context(ca_file: str) -> ssl.SSLContext:
    """The public CAs (certifi, as httpx and requests use by default), plus
    `ca_file` (KISSE_PUSH_CA_FILE) when set."""
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"KISSE_PUSH_CA_FILE: cannot load {ca_file!r}: {exc}") from None
    return context


# A push service (for Web Push, a server the client chose) may not hold a device's
# wake-ups back for longer than a wake-up lives anyway.
MAX_RETRY_AFTER = 3600.0


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header, delta-seconds or an HTTP date (RFC 9110
    §10.2.3; a date without a zone is UTC), at most MAX_RETRY_AFTER; None if
    absent or unreadable (`inf` and `nan` included)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


async def read_some(response: httpx.Response, limit: int) -> bytes:
    """Up to about `limit` bytes of a streamed answer: enough for an error message,
    never a flood (a Web Push endpoint is the client's choice)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)
