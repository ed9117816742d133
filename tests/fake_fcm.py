"""A local stand-in for Firebase Cloud Messaging (HTTP v1) and Google's OAuth2 token endpoint.

Both endpoints check what the real ones check:

* `POST /token`: the JWT-bearer grant (RFC 7523) a service account makes:
  `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`, `assertion` an RS256
  JWT signed by the service account's private key (verified with the public key
  this fake generated), `iss` the client email, `aud` Google's token endpoint (the
  audience google-auth always puts there) or this fake's own token URI, `scope`
  naming firebase.messaging, a lifetime of an hour at most. Answers
  `{"access_token", "expires_in", "token_type": "Bearer"}`, or Google's
  `{"error", "error_description"}` with 400.
* `POST /v1/projects/{project}/messages:send`: a Bearer token this fake issued
  and that has not expired, the project of the service account, and a
  content-free data message: `{"message": {"token", "data": {str: str},
  "android": {"priority": "HIGH"|"NORMAL", "ttl": "<n>s", "collapse_key"}}}` (no
  `notification` block, nothing else). Errors in FCM's shape
  (`error.status`, `error.details[].errorCode`).

Usage::

    async with FakeFCM() as fake:               # FakeFCM(tls=True) serves HTTPS
        settings = with_settings(**fake.settings(tmp_path))
        ...
        messages = await fake.wait_for(token, 1, timeout=10)
        assert messages[0]["message"]["data"] == {"type": "wake"}

Per registration token it can be told to answer 404 UNREGISTERED, 400 for a bad
token, 429 with Retry-After, 5xx, 401, or to hang (see the methods under "Faults").

`python -m tests.fake_fcm DIR` runs one on its own (a benchmark's server process
can use it) and prints the KISSE_* environment that points a server at it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import os
import re
import secrets
import ssl
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
# The audiences Google's token endpoint accepts in a grant assertion.
GOOGLE_AUDIENCES = (GOOGLE_TOKEN_URI, "https://www.googleapis.com/oauth2/v4/token",
                    "https://accounts.google.com/o/oauth2/token")
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = ("https://www.googleapis.com/auth/firebase.messaging",
              "https://www.googleapis.com/auth/cloud-platform")
TTL_RE = re.compile(r"^\d{1,10}(\.\d{1,9})?s$")
# Keys FCM refuses in `data` (reserved words and prefixes).
RESERVED_DATA = ("from", "notification", "message_type")
RESERVED_PREFIXES = ("google", "gcm")


@dataclasses.dataclass
class Fault:
    status: int                   # answer this status (0: hang, then answer normally)
    times: int                    # how many requests it lasts for (-1: for ever)
    retry_after: str | None = None
    seconds: float = 0.0          # hang for this long


def _fcm_error(status: int, code: str, message: str, error_code: str | None = None,
               violations: list[dict[str, str]] | None = None) -> dict[str, Any]:
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code})
    if violations:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations})
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if details:
        error["details"] = details
    return {"error": error}


class _Base(RequestHandler):
    fake: FakeFCM

    def initialize(self, fake: FakeFCM) -> None:
        self.fake = fake
        self.gone = False

    def on_connection_close(self) -> None:
        self.gone = True

    def answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.finish(json.dumps(body))


class _TokenHandler(_Base):
    async def post(self) -> None:
        fake = self.fake
        fake.token_requests += 1
        if fake.token_delay > 0:
            try:
                await asyncio.wait_for(fake._closing.wait(), fake.token_delay)
            except TimeoutError:
                pass
        content_type = self.request.headers.get("Content-Type", "")
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return self.refuse("invalid_request", "Expected a form-encoded body.")
        grant = self.get_body_argument("grant_type", "")
        if grant != JWT_BEARER:
            return self.refuse("unsupported_grant_type", f"Invalid grant_type: {grant}")
        assertion = self.get_body_argument("assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, fake.public_key, algorithms=["RS256"],
                                audience=[*GOOGLE_AUDIENCES, fake.token_uri], issuer=fake.client_email,
                                options={"require": ["iss", "aud", "exp", "iat", "scope"]}, leeway=60)
        except jwt.PyJWTError as error:
            return self.refuse("invalid_grant", f"Invalid JWT: {error}")
        if header.get("alg") != "RS256" or header.get("kid", fake.private_key_id) != fake.private_key_id:
            return self.refuse("invalid_grant", "Invalid JWT Signature.")
        if not isinstance(claims["exp"], int) or not isinstance(claims["iat"], int) \
                or not 0 < claims["exp"] - claims["iat"] <= 3600:
            return self.refuse("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) "
                                                "and in a reasonable timeframe.")
        scopes = str(claims["scope"]).split()
        if not any(scope in FCM_SCOPES for scope in scopes):
            return self.refuse("invalid_scope", "The scope does not include firebase.messaging.")
        fake.assertions.append(claims)
        access = f"ya29.fake-{secrets.token_urlsafe(24)}"
        fake.issued[access] = time.monotonic() + fake.token_lifetime
        self.answer(200, {"access_token": access, "expires_in": fake.token_lifetime, "token_type": "Bearer"})

    def refuse(self, error: str, description: str) -> None:
        self.fake.token_refusals.append(f"{error}: {description}")
        self.answer(400, {"error": error, "error_description": description})


class _SendHandler(_Base):
    async def post(self, project: str) -> None:
        fake = self.fake
        entry: dict[str, Any] = {"project": project, "headers": dict(self.request.headers),
                                 "body": None, "status": None}
        fake.requests.append(entry)
        status, body, headers = await self.handle(project, entry)
        entry["status"] = status
        if status == 200:
            fake.received_messages.setdefault(entry["token"], []).append(entry["body"])
            fake._changed()
        if not self.gone:
            self.answer(status, body, headers)

    async def handle(self, project: str, entry: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        fake = self.fake
        authorization = self.request.headers.get("Authorization", "")
        access = authorization[7:] if authorization.startswith("Bearer ") else ""
        expires = fake.issued.get(access)
        if expires is None or time.monotonic() >= expires:
            return 401, _fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. "
                                   "Expected OAuth 2 access token, login cookie or other valid authentication "
                                   "credential."), {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'}
        if project != fake.project_id:
            return 403, _fcm_error(403, "PERMISSION_DENIED", f"Permission 'cloudmessaging.messages.create' denied "
                                   f"on resource '//cloudresourcemanager.googleapis.com/projects/{project}'"), {}
        if not self.request.headers.get("Content-Type", "").startswith("application/json"):
            return 400, _fcm_error(400, "INVALID_ARGUMENT", "Expected a JSON body."), {}
        try:
            body = json.loads(self.request.body)
        except ValueError:
            return 400, _fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."), {}
        entry["body"] = body
        problem = _check_message(body)
        if problem:
            field, description = problem
            return 400, _fcm_error(400, "INVALID_ARGUMENT", f"Invalid value at '{field}': {description}",
                                   "INVALID_ARGUMENT", [{"field": field, "description": description}]), {}
        token = body["message"]["token"]
        entry["token"] = token
        fake.attempt_counts[token] = fake.attempt_counts.get(token, 0) + 1
        fault = fake._take_fault(token)
        if fault is not None:
            if fault.status == 0:
                try:
                    await asyncio.wait_for(fake._closing.wait(), fault.seconds)
                except TimeoutError:
                    pass
                if self.gone or fake._closing.is_set():
                    return 599, {}, {}   # the client gave up: nothing was delivered
            else:
                return _fault_answer(fault)
        return 200, {"name": f"projects/{project}/messages/0:{time.time_ns()}%{secrets.token_hex(8)}"}, {}


def _fault_answer(fault: Fault) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    status = fault.status
    if status == 404:
        return 404, _fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"), headers
    if status == 400:
        return 400, _fcm_error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration "
                               "token", "INVALID_ARGUMENT",
                               [{"field": "message.token", "description": "Invalid registration token"}]), headers
    if status == 401:
        return 401, _fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."), headers
    if status == 429:
        return 429, _fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED"), headers
    if status == 503:
        return 503, _fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"), headers
    return status, _fcm_error(status, "INTERNAL", "Internal error encountered.", "INTERNAL"), headers


def _check_message(body: Any) -> tuple[str, str] | None:
    """What FCM (and a content-free push) would refuse: (field, why), or None."""
    if not isinstance(body, dict) or set(body) != {"message"} or not isinstance(body["message"], dict):
        return "", "the body must be exactly {\"message\": {...}}"
    message = body["message"]
    extra = set(message) - {"token", "data", "android"}
    if extra:
        return f"message.{sorted(extra)[0]}", "not part of a content-free data message"
    token = message.get("token")
    if not isinstance(token, str) or not token:
        return "message.token", "a registration token is required"
    data = message.get("data")
    if not isinstance(data, dict):
        return "message.data", "a data object is required"
    for key, value in data.items():
        if not isinstance(value, str):
            return f"message.data[{key}]", "Proto field is not repeating, cannot start list." \
                if isinstance(value, list) else "data values must be strings"
        if key in RESERVED_DATA or key.startswith(RESERVED_PREFIXES):
            return f"message.data[{key}]", "reserved key"
    android = message.get("android")
    if not isinstance(android, dict):
        return "message.android", "an android config is required"
    extra = set(android) - {"priority", "ttl", "collapse_key"}
    if extra:
        return f"message.android.{sorted(extra)[0]}", "unexpected field"
    if android.get("priority") not in ("HIGH", "NORMAL"):
        return "message.android.priority", "must be HIGH or NORMAL"
    if not isinstance(android.get("ttl"), str) or not TTL_RE.match(android["ttl"]):
        return "message.android.ttl", "Illegal duration format; duration must end with 's'"
    collapse = android.get("collapse_key")
    if not isinstance(collapse, str) or not collapse:
        return "message.android.collapse_key", "a collapse key is required"
    return None


def _self_signed_tls(directory: str) -> tuple[bytes, ssl.SSLContext]:
    """A CA and a server certificate for 127.0.0.1 and localhost: (the CA's PEM, a server context)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Kisse fake FCM CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
    Path(cert_path).write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return ca.public_bytes(serialization.Encoding.PEM), context


class FakeFCM:
    """FCM's send endpoint and Google's token endpoint on 127.0.0.1, one random port."""

    def __init__(self, *, project_id: str = "kisse-fake-project", token_lifetime: int = 3600,
                 tls: bool = False) -> None:
        self.project_id = project_id
        self.token_lifetime = token_lifetime        # expires_in of the access tokens issued from now on
        self.token_delay = 0.0                      # seconds the token endpoint takes to answer
        self.tls = tls
        self.client_email = f"firebase-adminsdk-fake@{project_id}.iam.gserviceaccount.com"
        self.private_key_id = secrets.token_hex(20)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = self._key.public_key()
        self.ca_pem: bytes = b""                    # the CA to trust (tls=True)
        self.port = 0
        # What happened.
        self.token_requests = 0                     # POST /token, accepted or not
        self.token_refusals: list[str] = []         # why the refused ones were refused
        self.assertions: list[dict[str, Any]] = []  # the claims of each accepted grant
        self.issued: dict[str, float] = {}          # access token -> monotonic expiry
        self.requests: list[dict[str, Any]] = []    # every send: project, headers, body, token, status
        self.received_messages: dict[str, list[dict[str, Any]]] = {}  # registration token -> accepted bodies
        self.attempt_counts: dict[str, int] = {}    # registration token -> well-formed authorized sends
        self._faults: dict[str, deque[Fault]] = {}
        self._server: HTTPServer | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._closing = asyncio.Event()
        self._change = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> FakeFCM:
        self._tmp = tempfile.TemporaryDirectory(prefix="kisse-fake-fcm-")
        ssl_options = None
        if self.tls:
            self.ca_pem, ssl_options = _self_signed_tls(self._tmp.name)
        app = Application([
            (r"/token", _TokenHandler, {"fake": self}),
            (r"/v1/projects/([^/]+)/messages:send", _SendHandler, {"fake": self}),
        ])
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self._server = HTTPServer(app, ssl_options=ssl_options)
        self._server.add_sockets(sockets)
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> FakeFCM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- pointing Kisse at it -----------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def service_account(self) -> dict[str, Any]:
        """The service-account JSON, as the Firebase console downloads it (token_uri: this fake)."""
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
                                    + self.client_email.replace("@", "%40"),
            "universe_domain": "googleapis.com",
        }

    def credentials_file(self, directory: str | os.PathLike[str]) -> str:
        """Write the service-account JSON into `directory`; its path (for KISSE_PUSH_FCM_CREDENTIALS)."""
        path = Path(directory) / f"fcm-{self.port}.json"
        path.write_text(json.dumps(self.service_account(), indent=2))
        path.chmod(0o600)
        return str(path)

    def ca_file(self, directory: str | os.PathLike[str]) -> str:
        """Write the CA certificate into `directory` (tls=True); its path (for KISSE_PUSH_CA_FILE)."""
        if not self.tls:
            raise RuntimeError("this fake serves plain HTTP: there is no CA")
        path = Path(directory) / f"fcm-ca-{self.port}.pem"
        path.write_bytes(self.ca_pem)
        return str(path)

    def settings(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """The Settings fields that point Kisse at this fake (for `dataclasses.replace`)."""
        changes = {"push_fcm_credentials": self.credentials_file(directory), "push_fcm_url": self.base_url}
        if self.tls:
            changes["push_ca_file"] = self.ca_file(directory)
        return changes

    def env(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """The same as KISSE_* environment variables (for a server in another process)."""
        return {f"KISSE_{name.upper()}": value for name, value in self.settings(directory).items()}

    # -- what it received ---------------------------------------------------------------
    def received(self, token: str) -> list[dict[str, Any]]:
        """The bodies (`{"message": ...}`) accepted (200) for one registration token, oldest first."""
        return list(self.received_messages.get(token, ()))

    def attempts(self, token: str) -> int:
        """Well-formed, authorized sends to one registration token, whatever the answer."""
        return self.attempt_counts.get(token, 0)

    async def wait_for(self, token: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until `count` messages have been accepted for `token`; they (all of them so far)."""
        deadline = time.monotonic() + timeout
        while len(self.received_messages.get(token, ())) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"fake FCM: {len(self.received(token))} of {count} messages for the token "
                                   f"within {timeout} s ({self.attempts(token)} attempts)")
            self._change.clear()
            try:
                await asyncio.wait_for(self._change.wait(), left)
            except TimeoutError:
                pass
        return self.received(token)

    def _changed(self) -> None:
        self._change.set()

    # -- faults -------------------------------------------------------------------------
    def _add(self, token: str, fault: Fault) -> None:
        self._faults.setdefault(token, deque()).append(fault)

    def _take_fault(self, token: str) -> Fault | None:
        faults = self._faults.get(token)
        if not faults:
            return None
        fault = faults[0]
        if fault.times > 0:
            fault.times -= 1
            if fault.times == 0:
                faults.popleft()
        return fault

    def unregister(self, token: str) -> None:
        """From now on: 404 NOT_FOUND, errorCode UNREGISTERED (the app was uninstalled)."""
        self._add(token, Fault(404, -1))

    def invalidate(self, token: str) -> None:
        """From now on: 400 INVALID_ARGUMENT about `message.token` (not a valid registration token)."""
        self._add(token, Fault(400, -1))

    def throttle(self, token: str, times: int = 1, retry_after: str | None = "1") -> None:
        """The next `times` sends: 429 RESOURCE_EXHAUSTED (QUOTA_EXCEEDED), with this Retry-After."""
        self._add(token, Fault(429, times, retry_after))

    def fail(self, token: str, times: int = 1, status: int = 500, retry_after: str | None = None) -> None:
        """The next `times` sends: a server error (500 INTERNAL, 503 UNAVAILABLE, ...)."""
        self._add(token, Fault(status, times, retry_after))

    def unauthorize(self, token: str, times: int = 1) -> None:
        """The next `times` sends: 401 UNAUTHENTICATED, whatever the access token."""
        self._add(token, Fault(401, times))

    def hang(self, token: str, seconds: float, times: int = 1) -> None:
        """The next `times` sends: hold the request `seconds` before answering (not delivered if
        the client has gone by then)."""
        self._add(token, Fault(0, times, seconds=seconds))

    def revoke_access_tokens(self) -> None:
        """Forget every access token issued: the next send with one gets 401."""
        self.issued.clear()


async def _main(directory: str) -> None:
    async with FakeFCM() as fake:
        print(json.dumps(fake.env(directory)), flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import sys
    asyncio.run(_main(sys.argv[1] if len(sys.argv) > 1 else "."))
