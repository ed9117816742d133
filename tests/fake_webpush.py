"""A Web Push service on loopback that checks what a real one checks.

It hands out subscriptions the way a browser or a UnifiedPush distributor does
(a P-256 key pair and a 16-byte auth secret per subscription; the app gets the
endpoint and the public half), and for every push it receives it

- checks the RFC 8292 VAPID header: `vapid t=<JWT>, k=<key>`, the ES256 JWT
  verified against `k` (with PyJWT: independent of the py-vapid that signs),
  `aud` its own origin, `exp` in the future and at most 24 h away, `sub` a
  mailto: or https: contact; and, for a subscription made with an
  `application_server_key`, that `k` is that key (403 otherwise, as FCM does);
- checks `Content-Encoding: aes128gcm`, a `TTL`, a valid `Urgency` and `Topic`;
- DECRYPTS the body (RFC 8291) with the subscription's private key and auth secret;

and records the headers and the decrypted bytes. A push that fails a check is
answered 400/401/403/413/415, recorded with its `error` and listed in `errors`,
so a test can assert `fake.errors == []`.

    async with FakeWebPush() as fake:
        sub = fake.subscribe()
        registration = {"provider": "webpush", **sub}
        ...
        [push] = await fake.wait_for(sub, 1)
        assert push.json() == {"type": "wake"}

Answers can be scripted per subscription: `fake.answer(sub, 429, times=2,
retry_after=3)`, `fake.answer(sub, 500)`, `fake.hang(sub, 10)`,
`fake.unsubscribe(sub)` (410 from then on). An unknown endpoint gets 404.
`FakeWebPush(tls=True)` serves https with a throwaway CA at `fake.ca_file`
(give it to `KISSE_PUSH_CA_FILE`).
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import http_ece
import jwt
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MAX_PAYLOAD = 4096  # RFC 8030 §7.2: a push service must accept at least this much, may refuse more
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_URGENCIES = ("very-low", "low", "normal", "high")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@dataclass
class Push:
    """One request the fake received, valid or not."""

    endpoint: str
    status: int                       # what the fake answered (-1 while a hang holds it)
    headers: tornado.httputil.HTTPHeaders  # as received; case-insensitive (tornado writes TTL as Ttl)
    body: bytes                       # as received (encrypted)
    payload: bytes | None = None      # decrypted, when it decrypted
    claims: dict[str, Any] | None = None  # the verified VAPID JWT claims
    vapid_key: str | None = None      # the VAPID `k`
    error: str | None = None          # why the fake refused it, if it did
    abandoned: bool = False           # the sender hung up before the (held) answer
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        assert self.payload is not None, self.error
        return json.loads(self.payload)


@dataclass
class _Rule:
    status: int
    times: int | None
    retry_after: str | None
    hang: float
    headers: dict[str, str]


@dataclass
class _Subscription:
    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: str | None
    gone: bool = False
    rules: list[_Rule] = field(default_factory=list)


class FakeWebPush:
    def __init__(self, *, tls: bool = False, host: str = "127.0.0.1") -> None:
        self.tls = tls
        self.host = host
        self.origin = ""
        self.ca_file: str | None = None
        self.pushes: list[Push] = []
        self._subs: dict[str, _Subscription] = {}
        self._server: tornado.httpserver.HTTPServer | None = None
        self._closing: asyncio.Event | None = None
        self._tmp: str | None = None

    # -- lifecycle --------------------------------------------------------

    async def __aenter__(self) -> "FakeWebPush":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._closing = asyncio.Event()
        ssl_options = self._make_tls() if self.tls else None
        app = tornado.web.Application([(r"/wpush/([A-Za-z0-9_-]+)", _PushHandler, {"fake": self})])
        [sock] = tornado.netutil.bind_sockets(0, self.host, family=_family(self.host))
        port = sock.getsockname()[1]
        self._server = tornado.httpserver.HTTPServer(app, ssl_options=ssl_options)
        self._server.add_sockets([sock])
        name = "localhost" if self.tls else (f"[{self.host}]" if ":" in self.host else self.host)
        self.origin = f"{'https' if self.tls else 'http'}://{name}:{port}"

    async def stop(self) -> None:
        if self._closing is not None:
            self._closing.set()  # ends every hang
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- subscriptions ----------------------------------------------------

    def subscribe(self, *, application_server_key: str | None = None) -> dict[str, Any]:
        """A new subscription, as the browser's PushSubscription.toJSON() gives it:
        `{"endpoint", "keys": {"p256dh", "auth"}}`. With `application_server_key`
        (base64url, as `GET /api/push/vapid` returns it) only that VAPID key may push."""
        sub_id = secrets.token_urlsafe(18)
        private_key = ec.generate_private_key(ec.SECP256R1())
        sub = _Subscription(id=sub_id, endpoint=f"{self.origin}/wpush/{sub_id}", private_key=private_key,
                            auth=os.urandom(16), application_server_key=application_server_key)
        self._subs[sub_id] = sub
        return {"endpoint": sub.endpoint,
                "keys": {"p256dh": _b64url(_point(private_key.public_key())), "auth": _b64url(sub.auth)}}

    def unsubscribe(self, sub: dict[str, Any] | str) -> None:
        """The user revoked it: pushes to it get 410 Gone from now on."""
        self._sub(sub).gone = True

    def answer(self, sub: dict[str, Any] | str, status: int, *, times: int | None = None,
               retry_after: float | str | None = None, hang: float = 0.0,
               headers: dict[str, str] | None = None) -> None:
        """Answer the next `times` valid pushes to `sub` (None: all of them) with `status`,
        a `Retry-After` (seconds, or an HTTP date string) and after `hang` seconds.
        Rules apply in the order given; when they are spent, pushes get 201."""
        self._sub(sub).rules.append(_Rule(status, times, None if retry_after is None else str(retry_after),
                                          hang, dict(headers or {})))

    def hang(self, sub: dict[str, Any] | str, seconds: float, *, times: int | None = None) -> None:
        """Hold the next `times` pushes (None: all) `seconds` before answering 201 (the
        fake's stop ends every hang at once)."""
        self.answer(sub, 201, times=times, hang=seconds)

    def reset(self, sub: dict[str, Any] | str) -> None:
        """Forget the scripted answers: 201 again."""
        self._sub(sub).rules.clear()

    # -- what arrived -----------------------------------------------------

    def attempts(self, sub: dict[str, Any] | str | None = None) -> list[Push]:
        """Every request received (to `sub`, or to any), whatever it was answered."""
        if sub is None:
            return list(self.pushes)
        endpoint = self._endpoint(sub)
        return [p for p in self.pushes if p.endpoint == endpoint]

    def received(self, sub: dict[str, Any] | str | None = None) -> list[Push]:
        """The pushes accepted (2xx) for `sub` (or any), the sender having heard so (a held
        push the sender gave up on is not here: it will be sent again)."""
        return [p for p in self.attempts(sub) if 200 <= p.status < 300 and not p.abandoned]

    @property
    def errors(self) -> list[str]:
        """Why each refused push was refused (a correct sender leaves this empty)."""
        return [p.error for p in self.pushes if p.error]

    async def wait_for(self, sub: dict[str, Any] | str | None, count: int = 1, timeout: float = 10.0, *,
                       attempts: bool = False) -> list[Push]:
        """Wait until `sub` has been sent `count` accepted pushes (or requests, with
        `attempts=True`); return them all. AssertionError, saying what came, on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.attempts(sub) if attempts else self.received(sub)
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"fake web push: {len(got)} of {count} "
                                     f"{'requests' if attempts else 'pushes'} in {timeout:g} s; "
                                     f"errors: {self.errors}")
            await asyncio.sleep(0.01)

    # -- internals --------------------------------------------------------

    def _endpoint(self, sub: dict[str, Any] | str) -> str:
        return sub if isinstance(sub, str) else sub["endpoint"]

    def _sub(self, sub: dict[str, Any] | str) -> _Subscription:
        endpoint = self._endpoint(sub)
        return self._subs[endpoint.rsplit("/", 1)[-1]]

    async def _hang(self, seconds: float) -> None:
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _check(self, sub: _Subscription, push: Push) -> tuple[int, str] | None:
        """(status, why) for a request a real push service would refuse, else None."""
        headers = push.headers
        auth = headers.get("Authorization", "")
        match = re.match(r"^vapid\s+(.*)$", auth, re.IGNORECASE)
        if not match:
            return 401, "Authorization: not a vapid t=..., k=... header"
        params = {}
        for part in match.group(1).split(","):
            key, _, value = part.strip().partition("=")
            params[key.strip().lower()] = value.strip()
        if not params.get("t") or not params.get("k"):
            return 401, "Authorization: t and k required"
        push.vapid_key = params["k"]
        try:
            raw_key = _b64url_decode(params["k"])
            if len(raw_key) != 65:
                raise ValueError("not an uncompressed point")
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw_key)
        except ValueError as exc:
            return 401, f"Authorization: k is not a P-256 public key ({exc})"
        try:
            if jwt.get_unverified_header(params["t"]).get("alg") != "ES256":
                return 401, "VAPID JWT: alg is not ES256"
            claims = jwt.decode(params["t"], public_key, algorithms=["ES256"], audience=self.origin,
                                options={"require": ["aud", "exp", "sub"]})
        except jwt.PyJWTError as exc:
            return 401, f"VAPID JWT: {type(exc).__name__}: {exc}"
        push.claims = claims
        if not isinstance(claims["exp"], int) or claims["exp"] > time.time() + 24 * 3600 + 60:
            return 401, "VAPID JWT: exp more than 24 h away"
        if not re.match(r"^(mailto:\S+@\S+|https://\S+)$", str(claims["sub"])):
            return 401, "VAPID JWT: sub is not a mailto: or https: contact"
        if sub.application_server_key is not None and params["k"] != sub.application_server_key.rstrip("="):
            return 403, "VAPID key is not the application server key of the subscription"
        if headers.get("Content-Encoding", "").lower() != "aes128gcm":
            return 415, f"Content-Encoding: {headers.get('Content-Encoding')!r}, not aes128gcm"
        ttl = headers.get("TTL")
        if ttl is None or not ttl.isdigit():
            return 400, f"TTL: {ttl!r}, not a number of seconds"
        urgency = headers.get("Urgency")
        if urgency is not None and urgency not in _URGENCIES:
            return 400, f"Urgency: {urgency!r}"
        topic = headers.get("Topic")
        if topic is not None and not _TOPIC_RE.match(topic):
            return 400, f"Topic: {topic!r} is not 1-32 characters of base64url"
        if not push.body:
            return 400, "empty body"
        if len(push.body) > MAX_PAYLOAD:
            return 413, f"body of {len(push.body)} bytes"
        try:
            push.payload = http_ece.decrypt(push.body, private_key=sub.private_key, auth_secret=sub.auth,
                                            version="aes128gcm")
        except Exception as exc:
            return 400, f"does not decrypt: {type(exc).__name__}: {exc}"
        return None

    def _make_tls(self) -> ssl.SSLContext:
        """A throwaway CA and a certificate for localhost/127.0.0.1 signed by it."""
        self._tmp = tempfile.mkdtemp(prefix="fake-webpush-")
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake Web Push CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_file = os.path.join(self._tmp, "ca.pem")
        cert_file = os.path.join(self._tmp, "cert.pem")
        key_file = os.path.join(self._tmp, "key.pem")
        with open(self.ca_file, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        with open(cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_file, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        return context


def _family(host: str) -> int:
    import socket
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _PushHandler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeWebPush) -> None:
        self.fake = fake
        self._gone = False

    def on_connection_close(self) -> None:
        self._gone = True

    def check_xsrf_cookie(self) -> None:
        pass

    async def post(self, sub_id: str) -> None:
        fake = self.fake
        push = Push(endpoint=f"{fake.origin}/wpush/{sub_id}", status=0,
                    headers=tornado.httputil.HTTPHeaders(self.request.headers), body=self.request.body)
        fake.pushes.append(push)
        sub = fake._subs.get(sub_id)
        if sub is None:
            return self._answer(push, 404)
        refused = fake._check(sub, push)
        if refused:
            push.error = refused[1]
            return self._answer(push, refused[0], text=refused[1])
        if sub.gone:
            return self._answer(push, 410)
        rule = sub.rules[0] if sub.rules else None
        if rule is not None and rule.times is not None:
            rule.times -= 1
            if rule.times <= 0:
                sub.rules.pop(0)
        if rule is None:
            return self._answer(push, 201, headers={"Location": f"{fake.origin}/m/{secrets.token_urlsafe(12)}"})
        if rule.hang:
            push.status = -1  # held
            await fake._hang(rule.hang)
            if self._gone:
                push.status = rule.status
                push.abandoned = True
                return
        headers = dict(rule.headers)
        if rule.retry_after is not None:
            headers["Retry-After"] = rule.retry_after
        if 200 <= rule.status < 300:
            headers.setdefault("Location", f"{fake.origin}/m/{secrets.token_urlsafe(12)}")
        self._answer(push, rule.status, headers=headers)

    def _answer(self, push: Push, status: int, *, text: str = "", headers: dict[str, str] | None = None) -> None:
        push.status = status
        self.set_status(status)
        for key, value in (headers or {}).items():
            self.set_header(key, value)
        if text:
            self.set_header("Content-Type", "text/plain")
            self.write(text)
        self.finish()
