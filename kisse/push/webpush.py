"""Web Push (RFC 8030 delivery, RFC 8291 `aes128gcm` payload encryption, RFC 8292 VAPID).

This one provider serves browsers and UnifiedPush distributors alike: both hand
the app a subscription, `{endpoint, keys: {p256dh, auth}}`, that the server
POSTs an encrypted wake-up to. The push service sees the encrypted bytes, the
`TTL`, `Urgency` and `Topic` headers, and our VAPID identity; the payload (a
type and, for calls, the opaque call id: kisse/push/provider.py) is readable
only by the device.

Libraries: http-ece does the RFC 8291 encryption and py-vapid the ES256 JWT
of RFC 8292 (both the reference implementations pywebpush is built on); httpx
sends, asynchronously, so the loop never waits on a push service.

The endpoint URL is a capability (whoever knows it can push to the device):
it is never logged, only its host; nor are the keys.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import http
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import http_ece
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid
from py_vapid.jwt import sign as vapid_sign

from config.settings import Settings, SettingsError
from kisse.push import egress
from kisse.push.provider import Result, Wake, read_some, retry_after, ssl_context

log = logging.getLogger("kisse.push.webpush")

DEFAULT_SUBJECT = "mailto:admin@localhost"
GENERATED_KEY_WARNING = ("KISSE_PUSH_VAPID_PRIVATE_KEY is not set: a generated VAPID key, "
                         "subscriptions will not survive a restart")
# RFC 8292 §2: a JWT valid for at most 24 h. Ours live 12 h and are reused (per push
# service origin) while more than an hour is left, so a burst signs once.
JWT_LIFETIME = 12 * 3600
JWT_REUSE_MARGIN = 3600
MAX_ENDPOINT = 2048
MAX_RESPONSE_READ = 64 * 1024   # read this much of an answer (keeps the connection), then stop

# One generated development key per process: every WebPush of this process signs
# with it, and the warning is logged once.
_generated: Vapid | None = None


class WebPushOff(Exception):
    """Web Push has no VAPID key (production without KISSE_PUSH_VAPID_PRIVATE_KEY):
    the caller leaves the provider off. A key that is set but unusable raises
    `SettingsError` instead: that is a mistake to fix, not a choice."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Base64url with or without padding (some clients send standard base64: accepted too)."""
    raw = text.strip().replace("+", "-").replace("/", "_").rstrip("=")
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))


def topic(collapse: str) -> str:
    """The RFC 8030 `Topic` for a collapse key: at most 32 characters of the URL-safe
    base64 alphabet. Always a hash, so whatever the key holds, the push service (which
    reads the header in clear) learns only that two pushes share it."""
    return b64url(hashlib.sha256(collapse.encode()).digest())[:32]


@dataclass(frozen=True, slots=True)
class Subscription:
    endpoint: str
    host: str        # what logs may show
    audience: str    # the endpoint's origin: the VAPID `aud`
    p256dh: bytes    # the device's public key, uncompressed P-256 point
    auth: bytes      # the 16-byte auth secret


def parse_subscription(registration: Mapping[str, Any], *, env: str = "development") -> Subscription:
    """Check a Web Push registration; `ValueError` says what is wrong, never echoing the values.

    The endpoint must be https (plain http is accepted in development only: the
    tests' fakes), with no user info. `keys.p256dh` must be an uncompressed P-256
    point and `keys.auth` 16 bytes, both base64url. The registration API may call
    this to answer 400 at once rather than store what can never be sent to."""
    endpoint = registration.get("endpoint")
    keys = registration.get("keys")
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError("endpoint: required")
    if len(endpoint) > MAX_ENDPOINT:
        raise ValueError(f"endpoint: longer than {MAX_ENDPOINT} characters")
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        raise ValueError("endpoint: not a URL") from None
    schemes = ("https", "http") if env == "development" else ("https",)
    if parts.scheme not in schemes:
        raise ValueError(f"endpoint: must be an {' or '.join(schemes)} URL")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError("endpoint: needs a host and no user info")
    host = parts.hostname.lower()
    origin_host = f"[{host}]" if ":" in host else host
    if port is not None and port != (443 if parts.scheme == "https" else 80):
        origin_host += f":{port}"
    if not isinstance(keys, Mapping):
        raise ValueError("keys: required ({p256dh, auth})")
    try:
        p256dh = b64url_decode(keys["p256dh"])
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
        raise ValueError("keys.p256dh: not a base64url P-256 public key") from None
    if len(p256dh) != 65:
        raise ValueError("keys.p256dh: not an uncompressed P-256 point")
    try:
        auth = b64url_decode(keys["auth"])
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
        raise ValueError("keys.auth: not base64url") from None
    if len(auth) != 16:
        raise ValueError("keys.auth: must be 16 bytes")
    return Subscription(endpoint=endpoint, host=origin_host, audience=f"{parts.scheme}://{origin_host}",
                        p256dh=p256dh, auth=auth)


def load_vapid_key(path: str) -> Vapid:
    """The VAPID key at `path`: PEM (PKCS#8 or SEC1 "EC PRIVATE KEY", as `vapid --gen` or
    `openssl ecparam -genkey -name prime256v1` write it), or one line of base64url (the raw
    32-byte key web-push tools print, or DER). `SettingsError` names the variable.

    Not py-vapid's `Vapid.from_file`: given a missing path, that writes a new key there."""
    name = "KISSE_PUSH_VAPID_PRIVATE_KEY"
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
            vapid = Vapid(key)
        else:
            vapid = Vapid.from_string(data.decode("ascii").strip())
            key = vapid.private_key
    except Exception:  # cryptography and py-vapid raise a zoo of types for a bad key
        raise SettingsError(f"{name}: {path!r} is not an unencrypted P-256 private key (PEM)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SettingsError(f"{name}: {path!r} is not a P-256 (prime256v1) EC key")
    return vapid


def _generated_key() -> Vapid:
    global _generated
    if _generated is None:
        vapid = Vapid()
        vapid.generate_keys()
        _generated = vapid
        log.warning(GENERATED_KEY_WARNING)
    return _generated


class WebPush:
    """The Web Push provider (kisse/push/provider.py's `Provider`)."""

    name = "webpush"

    @staticmethod
    def enabled(settings: Settings) -> bool:
        """Whether `WebPush(settings)` has a key to sign with: one is configured, or
        this is development (a generated one). Reads no file."""
        return bool(settings.push_vapid_private_key) or settings.env == "development"

    def __init__(self, settings: Settings) -> None:
        """Load the VAPID key (blocking file read: start-up only) and open the HTTP client.

        Raises `WebPushOff` in production without a key, `SettingsError` for a key,
        subject or CA file that is set but unusable."""
        if settings.push_vapid_private_key:
            self._vapid = load_vapid_key(settings.push_vapid_private_key)
        elif settings.env == "development":
            self._vapid = _generated_key()
        else:
            raise WebPushOff("KISSE_PUSH_VAPID_PRIVATE_KEY is not set: Web Push is off")
        self._subject = settings.push_vapid_subject or DEFAULT_SUBJECT
        if not re.match(r"^(mailto:[^@\s]+@\S+|https://\S+)$", self._subject):
            raise SettingsError("KISSE_PUSH_VAPID_SUBJECT: must be a mailto: address or an https: URL, "
                                f"got {self._subject!r}")
        public = self._vapid.public_key.public_bytes(serialization.Encoding.X962,
                                                     serialization.PublicFormat.UncompressedPoint)
        self._public_key = b64url(public)
        self._env = settings.env
        self._timeout = settings.push_timeout
        self._authorization: dict[str, tuple[str, float]] = {}  # audience -> (header, reuse until)
        # httpx logs each request's full URL at INFO: for Web Push that is the capability.
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:
            httpx_log.setLevel(logging.WARNING)
        verify = ssl_context(settings.push_ca_file)
        limits = httpx.Limits(max_connections=max(10, settings.push_workers * 2),
                              max_keepalive_connections=max(10, settings.push_workers * 2))
        # In production endpoints are reached on public addresses only, or through the
        # HTTPS proxy if one is set (kisse/push/egress.py); in development the tests' fakes
        # are on loopback.
        guarded: dict[str, Any] = {}
        if settings.env == "production":
            proxy = egress.https_proxy()
            guarded = {"trust_env": False, "transport": egress.public_transport(verify, limits)} if proxy is None \
                else {"trust_env": False, "mounts": {"all://": httpx.AsyncHTTPTransport(
                    proxy=proxy, verify=verify, limits=limits)}}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.push_timeout),
            verify=verify,
            follow_redirects=False,
            headers={"User-Agent": "Kisse"},
            limits=limits,
            **guarded,
        )

    def application_server_key(self) -> str:
        """The VAPID public key, an uncompressed P-256 point in base64url without padding:
        what `GET /api/push/vapid` returns and clients subscribe with."""
        return self._public_key

    def authorization(self, audience: str, now: float | None = None) -> str:
        """The RFC 8292 `Authorization: vapid t=<JWT>, k=<key>` header for a push service origin."""
        now = time.time() if now is None else now
        cached = self._authorization.get(audience)
        if cached and now < cached[1]:
            return cached[0]
        exp = int(now) + JWT_LIFETIME
        token = vapid_sign({"aud": audience, "exp": exp, "sub": self._subject}, self._vapid.private_key)
        header = f"vapid t={token}, k={self._public_key}"
        if len(self._authorization) >= 1024:
            self._authorization.clear()
        self._authorization[audience] = (header, exp - JWT_REUSE_MARGIN)
        return header

    @staticmethod
    def encrypt(subscription: Subscription, plaintext: bytes) -> bytes:
        """RFC 8291: aes128gcm to the device's key, with a fresh ephemeral key and salt."""
        return http_ece.encrypt(plaintext, salt=os.urandom(16), private_key=ec.generate_private_key(ec.SECP256R1()),
                                dh=subscription.p256dh, auth_secret=subscription.auth, version="aes128gcm")

    async def send(self, registration: dict[str, Any], wake: Wake) -> Result:
        try:
            subscription = parse_subscription(registration, env=self._env)
        except ValueError as exc:
            log.warning("web push: unusable registration dropped (%s)", exc)
            return Result("dead", reason="invalid_subscription")
        body = self.encrypt(subscription, json.dumps(wake.payload()).encode())
        headers = {
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(max(0, int(wake.ttl))),
            "Urgency": "high" if wake.urgent else "normal",
            "Topic": topic(wake.collapse),
            "Authorization": self.authorization(subscription.audience),
        }
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client.stream("POST", subscription.endpoint, content=body,
                                               headers=headers) as response:
                    answer = await read_some(response, MAX_RESPONSE_READ)
                    status = response.status_code
                    after = retry_after(response.headers.get("Retry-After"))
        except (TimeoutError, httpx.TimeoutException):
            log.info("web push to %s: timed out", subscription.host)
            return Result("retry", reason="timeout")
        except httpx.HTTPError as exc:
            if isinstance(exc.__cause__, egress.NotPublic):
                log.warning("web push to %s: not a public address, subscription dropped", subscription.host)
                return Result("dead", reason="endpoint_not_public")
            log.info("web push to %s: %s", subscription.host, type(exc).__name__)
            return Result("retry", reason=type(exc).__name__)
        return self._result(subscription, status, after, answer)

    @staticmethod
    def _result(subscription: Subscription, status: int, after: float | None, answer: bytes) -> Result:
        reason = _reason(status)
        if 200 <= status < 300:
            log.debug("web push to %s: %d", subscription.host, status)
            return Result("sent", status=status)
        if status in (404, 410):
            log.info("web push to %s: %s, subscription gone", subscription.host, reason)
            return Result("dead", status=status, reason=reason)
        if status in (408, 429) or status >= 500:
            log.info("web push to %s: %s, retry%s", subscription.host, reason,
                     f" after {after:g} s" if after is not None else "")
            return Result("retry", status=status, retry_after=after, reason=reason)
        # 400 (malformed), 401/403 (VAPID refused), 413 (too big), 3xx: retrying will not mend it.
        log.warning("web push to %s: %s: %s", subscription.host, reason, _excerpt(answer))
        return Result("failed", status=status, reason=reason)

    async def close(self) -> None:
        await self._client.aclose()


def _reason(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _excerpt(answer: bytes, limit: int = 160) -> str:
    """A push service's error text, printable ASCII only and short, for the operator's log."""
    text = answer[:limit * 4].decode("utf-8", "replace")
    return "".join(c if " " <= c <= "~" else " " for c in text)[:limit].strip() or "-"
