"""Firebase Cloud Messaging, HTTP v1: Android phones (and anything with Google Play services).

The server holds a Firebase service-account JSON (`KISSE_PUSH_FCM_CREDENTIALS`).
google-auth signs the OAuth2 JWT-bearer grant with its private key and exchanges
it at the JSON's `token_uri` for an access token (an hour): that exchange is
synchronous HTTP (requests), so it runs in a small thread pool, one at a time
(an asyncio lock), and the token is kept until shortly before it expires. The
pushes themselves go through one `httpx.AsyncClient`:

    POST {KISSE_PUSH_FCM_URL}/v1/projects/{project_id}/messages:send
    Authorization: Bearer <access token>
    {"message": {"token": "<registration token>",
                 "data": {"type": "call", "call_id": "..."},
                 "android": {"priority": "HIGH", "ttl": "45s", "collapse_key": "call-..."}}}

A data message and nothing else (no `notification` block): the app wakes,
connects, `sync`s and decides what to show; FCM learns the device, the time and
the type (docs/SECURITY.md). Answers: 2xx sent; 404 / `UNREGISTERED`, or 400
`INVALID_ARGUMENT` about `message.token`, dead; 401 refreshes the access token
once and sends again, then failed; 429 and 5xx retry (with `Retry-After`);
a timeout or a connection error retry; any other 4xx failed.

Neither the registration token nor the access token is ever logged.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import google.auth.exceptions
import google.auth.transport.requests
import httpx
import requests
import requests.adapters
from google.oauth2 import service_account

from kisse.push.provider import Result, Wake, retry_after, ssl_context

log = logging.getLogger("kisse.push.fcm")
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
REFRESH_EARLY = 60.0  # seconds before expiry a token is replaced (a quarter of its life if that is shorter)


class _ContextAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose TLS connections verify with our SSL context (extra CA included)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(*args, **kwargs)


class _TimedRequest(google.auth.transport.requests.Request):
    """google-auth's requests transport with our timeout (its default is 120 s)."""

    def __init__(self, session: requests.Session, timeout: float) -> None:
        super().__init__(session)
        self._timeout = timeout

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: float | None = None, **kwargs: Any) -> Any:
        return super().__call__(url, method=method, body=body, headers=headers,
                                timeout=timeout or self._timeout, **kwargs)


class _TokenUnavailable(Exception):
    def __init__(self, result: Result) -> None:
        super().__init__(result.reason)
        self.result = result


class _AccessTokens:
    """The OAuth2 access token: fetched off the loop, one refresh at a time, kept until near expiry."""

    def __init__(self, info: dict[str, Any], ca_file: str, timeout: float) -> None:
        self._credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
        self._session = requests.Session()
        if ca_file:
            self._session.mount("https://", _ContextAdapter(ssl_context(ca_file)))
        self._request = _TimedRequest(self._session, timeout)
        # Two threads: a refresh abandoned after its timeout may still be finishing in one.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kisse-fcm-oauth")
        self._lock = asyncio.Lock()
        self._timeout = timeout
        self._token: str | None = None
        self._fresh_until = 0.0  # time.monotonic()
        self.refreshes = 0       # token requests made (tests, metrics)

    def _usable(self, stale: str | None) -> bool:
        return self._token is not None and self._token != stale and time.monotonic() < self._fresh_until

    async def get(self, stale: str | None = None) -> str:
        """A valid access token; `stale` is one the provider refused (401): never that one again."""
        if self._usable(stale):
            return self._token  # type: ignore[return-value]
        async with self._lock:
            if self._usable(stale):  # another send refreshed it while this one waited
                return self._token  # type: ignore[return-value]
            loop = asyncio.get_running_loop()
            self.refreshes += 1
            try:
                token, expiry = await asyncio.wait_for(loop.run_in_executor(self._executor, self._refresh),
                                                       self._timeout)
            except TimeoutError:
                log.warning("FCM: the OAuth token endpoint did not answer within %.1f s", self._timeout)
                raise _TokenUnavailable(Result("retry", reason="oauth timeout")) from None
            except google.auth.exceptions.RefreshError as error:
                retryable = bool(getattr(error, "retryable", False))
                code = _oauth_error(error)
                log.warning("FCM: the OAuth token endpoint refused the service account: %s", code)
                raise _TokenUnavailable(Result("retry" if retryable else "failed", reason=f"oauth {code}")) from None
            except google.auth.exceptions.TransportError as error:
                log.warning("FCM: the OAuth token endpoint is unreachable: %s", type(error.__cause__ or error).__name__)
                raise _TokenUnavailable(Result("retry", reason="oauth unreachable")) from None
            except Exception as error:  # a broken key, say: not the registration's fault
                log.error("FCM: getting an OAuth token failed: %s", type(error).__name__)
                raise _TokenUnavailable(Result("failed", reason="oauth error")) from None
            now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # google-auth: naive UTC
            left = (expiry - now).total_seconds() if expiry is not None else 300.0
            self._token = token
            self._fresh_until = time.monotonic() + left - min(REFRESH_EARLY, max(left, 0.0) / 4)
            return token

    def _refresh(self) -> tuple[str, datetime.datetime | None]:
        """In a worker thread: the JWT-bearer grant at the JSON's token_uri."""
        self._credentials.refresh(self._request)
        return self._credentials.token, self._credentials.expiry

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._session.close()


def _oauth_error(error: Exception) -> str:
    """The OAuth error code (`invalid_grant`...) of a RefreshError, nothing the server echoed."""
    for arg in getattr(error, "args", ()):
        if isinstance(arg, dict) and isinstance(arg.get("error"), str):
            return arg["error"][:64]
    return "refused"


def _error(response: httpx.Response) -> dict[str, Any]:
    """FCM's `error` object, or {} when the answer is not FCM's JSON."""
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _error_codes(error: dict[str, Any]) -> list[str]:
    details = error.get("details")
    return [d["errorCode"] for d in details if isinstance(d, dict) and isinstance(d.get("errorCode"), str)] \
        if isinstance(details, list) else []


def _about_token(error: dict[str, Any]) -> bool:
    """Whether a 400 INVALID_ARGUMENT blames the registration token (and not our message)."""
    for detail in error.get("details") or ():
        if isinstance(detail, dict):
            for violation in detail.get("fieldViolations") or ():
                if isinstance(violation, dict) and violation.get("field") == "message.token":
                    return True
    message = error.get("message")
    return isinstance(message, str) and "registration token" in message.lower()


class FCM:
    """The FCM HTTP v1 provider (kisse/push/provider.py)."""

    name = "fcm"

    @staticmethod
    def enabled(settings: Any) -> bool:
        return bool(settings.push_fcm_credentials)

    def __init__(self, settings: Any) -> None:
        path = settings.push_fcm_credentials
        try:
            with open(path, encoding="utf-8") as file:
                info = json.load(file)
        except (OSError, ValueError) as error:
            raise ValueError(f"KISSE_PUSH_FCM_CREDENTIALS {path!r}: not a readable JSON file ({error})") from None
        if not isinstance(info, dict) or info.get("type", "service_account") != "service_account":
            raise ValueError(f"KISSE_PUSH_FCM_CREDENTIALS {path!r}: not a service-account JSON")
        missing = [key for key in ("project_id", "client_email", "private_key") if not info.get(key)]
        if missing:
            raise ValueError(f"KISSE_PUSH_FCM_CREDENTIALS {path!r}: missing {', '.join(missing)}")
        info = {**info, "token_uri": info.get("token_uri") or GOOGLE_TOKEN_URI}
        self.project_id: str = info["project_id"]
        self._timeout = float(settings.push_timeout)
        self._url = (f"{settings.push_fcm_url.rstrip('/')}/v1/projects/"
                     f"{quote(self.project_id, safe='')}/messages:send")
        self._tokens = _AccessTokens(info, settings.push_ca_file, self._timeout)
        self._client = httpx.AsyncClient(timeout=self._timeout, verify=ssl_context(settings.push_ca_file),
                                         follow_redirects=False)

    @property
    def token_refreshes(self) -> int:
        """OAuth token requests made so far."""
        return self._tokens.refreshes

    @staticmethod
    def message(token: str, wake: Wake) -> dict[str, Any]:
        """The request body for one registration token: a content-free data message."""
        return {"message": {
            "token": token,
            "data": {key: str(value) for key, value in wake.payload().items() if value is not None},
            "android": {
                "priority": "HIGH" if wake.urgent else "NORMAL",
                "ttl": f"{max(0, int(wake.ttl))}s",
                "collapse_key": wake.collapse,
            },
        }}

    async def send(self, registration: dict[str, Any], wake: Wake) -> Result:
        token = registration.get("token")
        if not isinstance(token, str) or not token:
            return Result("dead", reason="no token")
        body = json.dumps(self.message(token, wake), separators=(",", ":")).encode()
        refused: str | None = None
        while True:
            try:
                access = await self._tokens.get(stale=refused)
            except _TokenUnavailable as unavailable:
                return unavailable.result
            try:
                async with asyncio.timeout(self._timeout):  # the whole exchange, not each read
                    response = await self._client.post(self._url, content=body, headers={
                        "Authorization": f"Bearer {access}",
                        "Content-Type": "application/json; charset=UTF-8",
                    })
            except (TimeoutError, httpx.TimeoutException):
                return Result("retry", reason="timeout")
            except httpx.HTTPError as error:  # refused, reset, TLS, protocol
                log.info("FCM unreachable: %s", type(error).__name__)
                return Result("retry", reason="unreachable")
            if response.status_code == 401 and refused is None:
                refused = access  # expired or revoked early: one fresh token, one more try
                continue
            return self._outcome(response)

    def _outcome(self, response: httpx.Response) -> Result:
        status = response.status_code
        if 200 <= status < 300:
            return Result("sent", status)
        error = _error(response)
        codes = _error_codes(error)
        reason = (codes[0] if codes else error.get("status")) or f"http {status}"
        if not isinstance(reason, str):
            reason = f"http {status}"
        if "UNREGISTERED" in codes or (status == 404 and error.get("status") == "NOT_FOUND"):
            return Result("dead", status, reason="UNREGISTERED")
        if status == 400 and (error.get("status") == "INVALID_ARGUMENT" or "INVALID_ARGUMENT" in codes) \
                and _about_token(error):
            return Result("dead", status, reason="INVALID_ARGUMENT")
        if status == 429 or status >= 500:
            return Result("retry", status, retry_after=retry_after(response.headers.get("Retry-After")),
                          reason=reason)
        # 400 about our message, 401 after a fresh token, 403 (SENDER_ID_MISMATCH: the token is another
        # Firebase project's, which is a misconfiguration more often than a dead registration), ...
        log.warning("FCM refused a push: %d %s", status, reason)
        return Result("failed", status, reason=reason)

    async def close(self) -> None:
        await self._client.aclose()
        self._tokens.close()
