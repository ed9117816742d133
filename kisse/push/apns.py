"""Apple Push Notification service (APNs): token-based auth, HTTP/2.

Two kinds of push reach an iPhone:

- An incoming call, to a device that registered a PushKit `voip_token`: a VoIP
  push (`apns-push-type: voip`, topic `<bundle id>.voip`, priority 10). iOS
  wakes or launches the app at once, even after a force-quit, and the app must
  report the call to CallKit straight away, which rings.
- Everything else (a message wake-up, the end of a ringing call, a call to a
  device without a VoIP token): a background push (`apns-push-type:
  background`, `aps.content-available: 1`, priority 5, which Apple requires
  for background pushes). The app wakes for a few seconds, connects and
  `sync`s. `call_end` never goes over VoIP: iOS 13+ kills an app that gets a
  VoIP push and reports no new call to CallKit, and after a few times stops
  delivering its VoIP pushes altogether.

  A call without a VoIP token stays a background push, not an `alert` with
  priority 10: an alert needs `aps.alert`, text the server would choose and
  the lock screen would show (the payload is a type and a call id, nothing
  else, docs/SECURITY.md), and it could not be taken back when the call is
  answered elsewhere. Background pushes are throttled by iOS, so such a call
  may ring late or not at all; an app that wants calls to ring registers a
  PushKit token (docs/INTEGRATION.md).

The payload is `{"aps": {...}, **wake.payload()}`: a type and, for calls, the
opaque call id. Apple sees the device token, the time, the push type and the
collapse id (`wake.collapse`, hashed when it would be longer than Apple's 64
bytes).

Auth is a provider token: an ES256 JWT (`kid` = key id, `iss` = team id, `iat`)
signed with the .p8 key (PyJWT over cryptography). Apple refuses a token older
than an hour and one refreshed more often than every 20 minutes, so one token
is signed and reused for 50 minutes; when Apple answers 403
ExpiredProviderToken or InvalidProviderToken, a new one is signed and the push
sent once more. Signing takes microseconds: it happens on the loop.

Transport: one httpx client speaking HTTP/2 only (as Apple requires; h2 does
the framing), its connection kept open and shared by every push, as Apple asks.
Each request has `KISSE_PUSH_TIMEOUT` for each phase (connect, write, read) and
half as much again for the whole, since one stream that Apple never answers on
an otherwise busy connection would not trip the read timeout.

Device tokens are capabilities: they are never logged.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import time
from typing import Any, Callable

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from config.settings import Settings, SettingsError
from kisse.push.provider import Result, Wake, read_some, retry_after, ssl_context

log = logging.getLogger("kisse.push.apns")

# Apple: a provider token is refused once older than an hour, and refreshing one more
# often than every 20 minutes is answered 429 TooManyProviderTokenUpdates.
TOKEN_REUSE = 50 * 60
MAX_COLLAPSE_ID = 64            # bytes (apns-collapse-id)
MAX_RESPONSE_READ = 16 * 1024   # an APNs error body is a few dozen bytes
WHOLE_REQUEST = 1.5             # × push_timeout: the deadline of one request, all phases together
# A device token is hex: 32 bytes today, and Apple says the length may grow.
_TOKEN_RE = re.compile(r"^[0-9A-Fa-f]{16,512}$")

DEAD = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})      # on 400
PROVIDER_TOKEN = frozenset({"ExpiredProviderToken", "InvalidProviderToken"})  # on 403


def enabled(settings: Settings) -> bool:
    return bool(settings.push_apns_key and settings.push_apns_key_id
                and settings.push_apns_team_id and settings.push_apns_topic)


def load_key(path: str) -> ec.EllipticCurvePrivateKey:
    """The APNs auth key: the .p8 file Apple hands out (PKCS#8 PEM, P-256).
    `SettingsError` names the variable; the key itself is never shown."""
    name = "KISSE_PUSH_APNS_KEY"
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SettingsError(f"{name}: {path!r} is not an unencrypted private key in PEM (.p8)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SettingsError(f"{name}: {path!r} is not a P-256 EC key (an APNs .p8 auth key)")
    return key


def collapse_id(collapse: str) -> str | None:
    """`apns-collapse-id`: the key itself when it is short printable ASCII, else its SHA-256 in hex
    (64 characters, Apple's limit); None for an empty key (no collapsing)."""
    if not collapse:
        return None
    raw = collapse.encode("utf-8")
    if len(raw) <= MAX_COLLAPSE_ID and all(0x21 <= b <= 0x7E for b in raw):
        return collapse
    return hashlib.sha256(raw).hexdigest()


class APNs:
    """The APNs provider (kisse/push/provider.py's `Provider`)."""

    name = "apns"
    enabled = staticmethod(enabled)

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        """Load the .p8 key and the CA file (blocking reads: start-up only) and make the client.
        `SettingsError` for a key or CA file that is set but unusable. `clock` (wall time, the
        JWT's `iat`) is for tests."""
        if not enabled(settings):
            raise SettingsError("KISSE_PUSH_APNS_KEY, KISSE_PUSH_APNS_KEY_ID, KISSE_PUSH_APNS_TEAM_ID and "
                                "KISSE_PUSH_APNS_TOPIC must all be set for APNs")
        self._key = load_key(settings.push_apns_key)
        self._key_id = settings.push_apns_key_id
        self._team_id = settings.push_apns_team_id
        self._topic = settings.push_apns_topic
        self._base = settings.push_apns_url.rstrip("/")
        self._timeout = settings.push_timeout
        self._clock = clock
        self._jwt: str | None = None
        self._jwt_iat = 0.0
        # httpx logs each request's URL at INFO, and httpcore, h2 and hpack log headers at DEBUG:
        # for APNs they hold the device token and the provider token.
        for name in ("httpx", "httpcore", "h2", "hpack"):
            library_log = logging.getLogger(name)
            if library_log.level == logging.NOTSET:
                library_log.setLevel(logging.WARNING)
        self._client = httpx.AsyncClient(
            http1=False, http2=True,  # Apple speaks HTTP/2 only
            timeout=httpx.Timeout(settings.push_timeout),
            verify=ssl_context(settings.push_ca_file),
            follow_redirects=False,
            headers={"User-Agent": "Kisse"},
            # One connection carries many concurrent streams; keep it open between bursts.
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=300.0),
        )

    # -- the provider token -------------------------------------------------------------
    def provider_token(self) -> str:
        """The current JWT, signed anew when it is 50 minutes old (or was refused)."""
        now = self._clock()
        if self._jwt is None or not 0 <= now - self._jwt_iat < TOKEN_REUSE:
            iat = int(now)
            self._jwt = jwt.encode({"iss": self._team_id, "iat": iat}, self._key, algorithm="ES256",
                                   headers={"kid": self._key_id, "typ": None})  # Apple's header: alg, kid
            self._jwt_iat = float(iat)
        return self._jwt

    def _refused(self, token: str) -> None:
        """Apple refused `token`: the next `provider_token()` signs a new one, unless another
        push has already replaced it (several in flight when it expired: one new token)."""
        if self._jwt == token:
            self._jwt = None

    # -- sending ----------------------------------------------------------------------
    def request(self, registration: dict[str, Any], wake: Wake) -> tuple[str | None, dict[str, str], bytes]:
        """The device token to push to (None: the registration lacks it), the headers
        (without authorization) and the body of the push for `wake`."""
        voip = wake.kind == "call" and bool(registration.get("voip_token"))
        device = registration.get("voip_token" if voip else "token") or None
        headers = {
            "apns-topic": f"{self._topic}.voip" if voip else self._topic,
            "apns-push-type": "voip" if voip else "background",
            "apns-priority": "10" if voip else "5",
            "apns-expiration": str(int(self._clock()) + max(0, int(wake.ttl))),
            "content-type": "application/json",
        }
        collapse = collapse_id(wake.collapse)
        if collapse:
            headers["apns-collapse-id"] = collapse
        aps: dict[str, Any] = {} if voip else {"content-available": 1}
        body = json.dumps({"aps": aps, **wake.payload()}, separators=(",", ":")).encode()
        return device, headers, body

    async def send(self, registration: dict[str, Any], wake: Wake) -> Result:
        device, headers, body = self.request(registration, wake)
        if device is None:
            return Result("failed", reason="no token")
        if not isinstance(device, str) or not _TOKEN_RE.match(device):
            log.warning("apns: a malformed device token, registration dropped")
            return Result("dead", reason="malformed token")
        kind = headers["apns-push-type"]
        bearer = self.provider_token()
        result = await self._post(device, headers, body, bearer)
        if result.status == 403 and result.reason in PROVIDER_TOKEN:
            log.info("apns: %s, signing a new provider token", result.reason)
            self._refused(bearer)
            bearer = self.provider_token()
            result = await self._post(device, headers, body, bearer)
            if result.status == 403 and result.reason in PROVIDER_TOKEN:
                self._refused(bearer)
                log.error("apns: %s twice: check KISSE_PUSH_APNS_KEY, KISSE_PUSH_APNS_KEY_ID and "
                          "KISSE_PUSH_APNS_TEAM_ID (and the clock)", result.reason)
                return result
        self._log(kind, result)
        return result

    async def _post(self, device: str, headers: dict[str, str], body: bytes, bearer: str) -> Result:
        try:
            async with asyncio.timeout(self._timeout * WHOLE_REQUEST):
                async with self._client.stream("POST", f"{self._base}/3/device/{device}", content=body,
                                               headers={**headers, "authorization": f"bearer {bearer}"}) as response:
                    answer = await read_some(response, MAX_RESPONSE_READ)
                    status = response.status_code
                    after = retry_after(response.headers.get("retry-after"))
        except (TimeoutError, httpx.TimeoutException):
            return Result("retry", reason="timeout")
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            # Connection refused or reset, GOAWAY, a TLS failure: another connection may do.
            return Result("retry", reason=type(exc).__name__)
        return _result(status, after, answer)

    def _log(self, kind: str, result: Result) -> None:
        if result.outcome == "sent":
            log.debug("apns %s push: sent", kind)
        elif result.outcome == "retry":
            log.info("apns %s push: %s, retry%s", kind, result.reason or result.status,
                     f" after {result.retry_after:g} s" if result.retry_after is not None else "")
        elif result.outcome == "dead":
            log.info("apns %s push: %s %s, registration dropped", kind, result.status, result.reason)
        else:
            log.warning("apns %s push: %s %s", kind, result.status, result.reason)

    async def close(self) -> None:
        await self._client.aclose()


def _result(status: int, after: float | None, answer: bytes) -> Result:
    """What Apple's answer means (its reasons: "Handling notification responses from APNs")."""
    if status == 200:
        return Result("sent", status=status)
    reason = _reason(answer) or str(status)
    if status == 410 or (status == 400 and reason in DEAD):
        return Result("dead", status=status, reason=reason)  # Unregistered, ExpiredToken; a token not ours
    if status == 429 or status >= 500:
        # TooManyRequests (to one device), TooManyProviderTokenUpdates, InternalServerError,
        # ServiceUnavailable, Shutdown.
        return Result("retry", status=status, retry_after=after, reason=reason)
    # 400 (a malformed push), 403 (a certificate or provider token refused), 404, 405, 413:
    # sending it again will not mend it.
    return Result("failed", status=status, reason=reason)


def _reason(answer: bytes) -> str | None:
    """The `reason` of Apple's JSON error body, if it has a plausible one."""
    try:
        reason = json.loads(answer).get("reason")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if isinstance(reason, str) and re.fullmatch(r"[A-Za-z]{1,64}", reason):
        return reason
    return None


