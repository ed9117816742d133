"""A local stand-in for the Apple Push Notification service: HTTP/2 over TLS on loopback.

It checks a push the way Apple does and answers as Apple would:

- TLS with ALPN "h2" and HTTP/2 only; `:method POST`, `:path /3/device/<hex token>`;
- `authorization: bearer <JWT>`: ES256, verified with the public half of the .p8
  key the fake generated, header `kid` = the key id, claims `iss` = the team id
  and `iat` within the last hour (403 MissingProviderToken, InvalidProviderToken,
  ExpiredProviderToken);
- `apns-topic` (the bundle id; `<bundle id>.voip` exactly when `apns-push-type`
  is `voip`), `apns-push-type` (background, voip or alert), `apns-priority`
  consistent with it (5 for background, 10 for voip, 5 or 10 for alert),
  `apns-expiration` (a UNIX time), `apns-collapse-id` (at most 64 bytes), no
  header twice;
- the payload: a JSON object with an `aps` dictionary, at most 4 KB (5 KB for
  VoIP); a background push has `aps.content-available: 1` and no alert, badge
  or sound.

A push that breaks a rule gets Apple's status and reason and is listed in
`errors` (a test of a correct client asserts it stays empty). A good one is
answered 200 with an `apns-id`, unless the test scripted another answer for its
device token: `unregistered`, `bad_device_token`, `too_many_requests`,
`server_error`, `respond` (any status and reason), `expire_provider_token`
(403 ExpiredProviderToken once, and that JWT is refused from then on, as Apple
would), `hang` (answer after N seconds).

Every request is recorded (`attempts`), the accepted ones apart (`received`,
`wait_for`). Use it in the test's loop (`async with FakeAPNs(tmp_path) as fake`)
or, for a test that drives a server process, on a thread of its own
(`with FakeAPNs(tmp_path) as fake`, then `fake.env()` for the process).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import re
import secrets
import ssl
import string
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_COLLAPSE_ID = 64
TOKEN_MAX_AGE = 3600
CLOCK_SKEW = 60          # seconds an `iat` may be ahead of the fake's clock
PUSH_TYPES = ("background", "voip", "alert")
_TOKEN_RE = re.compile(r"^[0-9A-Fa-f]+$")
_ID_ALPHABET = string.ascii_uppercase + string.digits


@dataclass
class Push:
    """One request the fake answered (or is holding, for `hang`)."""

    token: str                   # the device token from the path
    headers: dict[str, str]      # every header, pseudo-headers (`:method`, `:path`, ...) included
    body: bytes
    payload: Any                 # the JSON body, None if it was not JSON
    jwt_header: dict[str, Any] | None
    jwt_claims: dict[str, Any] | None
    status: int | None = None    # None while held by `hang` (and for ever if the client gave up)
    reason: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def push_type(self) -> str | None:
        return self.headers.get("apns-push-type")

    @property
    def topic(self) -> str | None:
        return self.headers.get("apns-topic")

    @property
    def priority(self) -> str | None:
        return self.headers.get("apns-priority")

    @property
    def jwt(self) -> str | None:
        value = self.headers.get("authorization", "")
        return value[7:] if value[:7].lower() == "bearer " else None

    def summary(self) -> dict[str, Any]:
        """Headers and payload, as a report would show them."""
        return {"headers": dict(self.headers), "payload": self.payload, "jwt_header": self.jwt_header,
                "jwt_claims": self.jwt_claims, "status": self.status}


@dataclass
class _Script:
    kind: str                     # "answer" | "hang" | "expire"
    remaining: int | None         # pushes it applies to; None: every one from now on
    status: int = 200
    reason: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


def _random_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


class FakeAPNs:
    """The fake APNs. Files (the .p8 auth key, the CA certificate) are written at construction,
    so `key_file`, `ca_file`, `key_id`, `team_id` and `topic` are there before `start()`;
    `url` once started."""

    def __init__(self, directory: str | Path, *, topic: str = "org.kisse.test",
                 key_id: str | None = None, team_id: str | None = None,
                 max_concurrent_streams: int = 1000) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.topic = topic
        self.key_id = key_id or _random_id()
        self.team_id = team_id or _random_id()
        self.max_concurrent_streams = max_concurrent_streams
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0                  # TLS connections accepted
        self.errors: list[str] = []           # broken rules: "<Reason>: <what>"
        self.provider_tokens: list[str] = []  # distinct JWTs, in the order first seen
        self._pushes: list[Push] = []
        self._scripts: dict[str, deque[_Script]] = {}
        self._refused_jwts: set[str] = set()
        self._lock = threading.Lock()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # one per connection
        self._tasks: set[asyncio.Task[Any]] = set()     # one per request being answered
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._write_files()

    # -- files -----------------------------------------------------------------------
    def _write_files(self) -> None:
        self._auth_key = ec.generate_private_key(ec.SECP256R1())
        self.public_key = self._auth_key.public_key()
        self.key_file = str(self.directory / f"fake-apns-AuthKey_{self.key_id}.p8")
        Path(self.key_file).write_bytes(self._auth_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Kisse test APNs CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_file = str(self.directory / "fake-apns-ca.pem")
        Path(self.ca_file).write_bytes(self.ca_pem)
        self._cert_file = str(self.directory / "fake-apns-server.pem")
        Path(self._cert_file).write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem)
        self._cert_key_file = str(self.directory / "fake-apns-server-key.pem")
        Path(self._cert_key_file).write_bytes(leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    # -- life ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The KISSE_PUSH_* variables that point a server process at this fake."""
        return {"KISSE_PUSH_APNS_KEY": self.key_file, "KISSE_PUSH_APNS_KEY_ID": self.key_id,
                "KISSE_PUSH_APNS_TEAM_ID": self.team_id, "KISSE_PUSH_APNS_TOPIC": self.topic,
                "KISSE_PUSH_APNS_URL": self.url, "KISSE_PUSH_CA_FILE": self.ca_file}

    def settings(self, base: Any = None, **overrides: Any) -> Any:
        """`base` (a `Settings`; default `Settings()`) pointed at this fake, with `overrides`."""
        from config.settings import Settings
        fields = {"push_apns_key": self.key_file, "push_apns_key_id": self.key_id,
                  "push_apns_team_id": self.team_id, "push_apns_topic": self.topic,
                  "push_apns_url": self.url, "push_ca_file": self.ca_file, **overrides}
        return dataclasses.replace(base if base is not None else Settings(), **fields)

    async def start(self) -> "FakeAPNs":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert_file, self._cert_key_file)
        context.set_alpn_protocols(["h2"])
        self._server = await asyncio.start_server(self._serve, self.host, self.port or 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
            for handler in list(self._handlers):
                handler.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "FakeAPNs":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def __enter__(self) -> "FakeAPNs":
        """Serve from a thread with a loop of its own (for tests without a running loop)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # pragma: no cover - reported to the caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake APNs", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._thread = self._loop = None

    # -- scripting answers -----------------------------------------------------------
    def respond(self, token: str, status: int, reason: str | None = None, *, times: int | None = 1,
                retry_after: float | str | None = None) -> None:
        """The next `times` good pushes to `token` (None: all of them) are answered
        `status` with `{"reason": reason}` (and `retry-after`, if given)."""
        after = None if retry_after is None else (str(int(retry_after)) if isinstance(retry_after, (int, float))
                                                  else retry_after)
        self._script(token, _Script("answer", times, status=status, reason=reason, retry_after=after))

    def unregistered(self, token: str) -> None:
        """From now on: 410 Unregistered (the app is gone from the device)."""
        self.respond(token, 410, "Unregistered", times=None)

    def bad_device_token(self, token: str) -> None:
        """From now on: 400 BadDeviceToken."""
        self.respond(token, 400, "BadDeviceToken", times=None)

    def too_many_requests(self, token: str, times: int = 1, retry_after: float | None = None) -> None:
        """The next `times` pushes: 429 TooManyRequests (too many to this device)."""
        self.respond(token, 429, "TooManyRequests", times=times, retry_after=retry_after)

    def server_error(self, token: str, times: int = 1, status: int = 500) -> None:
        """The next `times` pushes: 500 InternalServerError (or 503 ServiceUnavailable)."""
        self.respond(token, status, "InternalServerError" if status == 500 else "ServiceUnavailable",
                     times=times)

    def expire_provider_token(self, token: str | None = None) -> None:
        """The next push (to `token`, or to any device) is answered 403 ExpiredProviderToken,
        and the JWT it carried is refused the same way from then on."""
        self._script(token or "*", _Script("expire", 1, status=403, reason="ExpiredProviderToken"))

    def hang(self, token: str, seconds: float, times: int | None = 1) -> None:
        """The next `times` pushes to `token` are answered (200) only after `seconds`."""
        self._script(token, _Script("hang", times, seconds=seconds))

    def _script(self, token: str, script: _Script) -> None:
        with self._lock:
            self._scripts.setdefault(token, deque()).append(script)

    def _next_script(self, token: str) -> _Script | None:
        with self._lock:
            for key in (token, "*"):
                queue = self._scripts.get(key)
                if queue:
                    script = queue[0]
                    if script.remaining is not None:
                        script.remaining -= 1
                        if script.remaining <= 0:
                            queue.popleft()
                    return script
        return None

    # -- what it received ------------------------------------------------------------
    def attempts(self, token: str | None = None) -> list[Push]:
        """Every request (to `token`), whatever the answer."""
        with self._lock:
            return [p for p in self._pushes if token is None or p.token == token]

    def received(self, token: str | None = None) -> list[Push]:
        """The pushes (to `token`) answered 200: what the device would get."""
        return [p for p in self.attempts(token) if p.status == 200]

    async def wait_for(self, token: str, count: int = 1, timeout: float = 10.0) -> list[Push]:
        """Wait until `count` pushes to `token` were answered 200; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while (got := self._arrived(token, count, deadline, timeout)) is None:
            await asyncio.sleep(0.02)
        return got

    def wait_for_sync(self, token: str, count: int = 1, timeout: float = 10.0) -> list[Push]:
        """`wait_for` for a test without a loop (the fake then serves from its thread)."""
        deadline = time.monotonic() + timeout
        while (got := self._arrived(token, count, deadline, timeout)) is None:
            time.sleep(0.02)
        return got

    def _arrived(self, token: str, count: int, deadline: float, timeout: float) -> list[Push] | None:
        """The pushes, once there are `count`; None while waiting; AssertionError past `deadline`."""
        got = self.received(token)
        if len(got) >= count:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(self._shortfall(token, count, timeout))
        return None

    def _shortfall(self, token: str, count: int, timeout: float) -> str:
        tried = self.attempts(token)
        return (f"fake APNs: {len(self.received(token))} of {count} pushes to {token[:8]}… in {timeout:g} s "
                f"(answers: {[(p.status, p.reason) for p in tried]}; errors: {self.errors})")

    # -- serving ---------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        self.connections += 1
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn != "h2":
            self._error("NotHTTP2", f"the client negotiated {alpn!r}, APNs speaks HTTP/2 only")
            writer.close()
            self._writers.discard(writer)
            return
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams})
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        requests: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._error("ProtocolError", f"HTTP/2: {exc}")
                    writer.write(conn.data_to_send())
                    break
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        requests[event.stream_id] = (list(event.headers), bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        if event.stream_id in requests:
                            requests[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        if event.stream_id in requests:
                            headers, body = requests.pop(event.stream_id)
                            task = asyncio.get_running_loop().create_task(
                                self._answer(conn, writer, event.stream_id, headers, bytes(body)))
                            self._tasks.add(task)
                            task.add_done_callback(self._tasks.discard)
                    elif isinstance(event, h2.events.StreamReset):
                        requests.pop(event.stream_id, None)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        break
                writer.write(conn.data_to_send())
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter, stream_id: int,
                      raw_headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        push, status, reason, extra = self._handle(raw_headers, body)
        if push is not None and status is None:  # hang: answer later, if the client still listens
            script = extra.pop("hang")
            await asyncio.sleep(script.seconds)
            status = 200
        if push is not None:
            push.status, push.reason = status, reason
        response = [(":status", str(status)), ("apns-id", str(uuid.uuid4()).upper())]
        content = b""
        if reason is not None:
            answer: dict[str, Any] = {"reason": reason}
            if status == 410:
                answer["timestamp"] = int(time.time() * 1000)
            content = json.dumps(answer).encode()
            response += [("content-type", "application/json"), ("content-length", str(len(content)))]
        response += [(k, v) for k, v in extra.items()]
        if writer.is_closing():
            return
        try:
            conn.send_headers(stream_id, response, end_stream=not content)
            if content:
                conn.send_data(stream_id, content, end_stream=True)
            writer.write(conn.data_to_send())
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, ConnectionError):
            pass  # the client reset the stream or left (it timed out)

    def _handle(self, raw_headers: list[tuple[bytes, bytes]], body: bytes
                ) -> tuple[Push | None, int | None, str | None, dict[str, Any]]:
        """(the recorded push, status, reason, extra response headers); status None: hang."""
        headers: dict[str, str] = {}
        duplicates = []
        for name, value in raw_headers:
            key, text = name.decode("latin-1"), value.decode("utf-8", "replace")
            if key in headers and key != "cookie":
                duplicates.append(key)
            headers[key] = text
        path = headers.get(":path", "")
        token = path[len("/3/device/"):] if path.startswith("/3/device/") else ""
        try:
            payload: Any = json.loads(body) if body else None
        except ValueError:
            payload = None
        jwt_header = jwt_claims = None
        bearer = headers.get("authorization", "")
        if bearer[:7].lower() == "bearer ":
            try:
                jwt_header = jwt.get_unverified_header(bearer[7:])
                jwt_claims = jwt.decode(bearer[7:], options={"verify_signature": False})
            except jwt.PyJWTError:
                pass
        push = Push(token=token, headers=headers, body=body, payload=payload,
                    jwt_header=jwt_header, jwt_claims=jwt_claims)
        with self._lock:
            self._pushes.append(push)
        try:
            if duplicates:
                raise _Refusal(400, "DuplicateHeaders", f"{', '.join(duplicates)} more than once")
            self._check(headers, token, body, payload)
        except _Refusal as refusal:
            self._error(refusal.reason, refusal.detail)
            return push, refusal.status, refusal.reason, {}
        jwt_text = bearer[7:]
        with self._lock:
            if jwt_text not in self.provider_tokens:
                self.provider_tokens.append(jwt_text)
            refused = jwt_text in self._refused_jwts
        if refused:
            return push, 403, "ExpiredProviderToken", {}
        script = self._next_script(token)
        if script is None:
            return push, 200, None, {}
        if script.kind == "hang":
            return push, None, None, {"hang": script}
        if script.kind == "expire":
            with self._lock:
                self._refused_jwts.add(jwt_text)
            return push, 403, "ExpiredProviderToken", {}
        extra = {"retry-after": script.retry_after} if script.retry_after is not None else {}
        return push, script.status, script.reason, extra

    def _check(self, headers: dict[str, str], token: str, body: bytes, payload: Any) -> None:
        """Apple's rules; `_Refusal` with Apple's status and reason for the first one broken."""
        method, path = headers.get(":method"), headers.get(":path", "")
        if method != "POST":
            raise _Refusal(405, "MethodNotAllowed", f":method {method}")
        if not path.startswith("/3/device/"):
            raise _Refusal(404, "BadPath", f":path {path[:40]}")
        if not token:
            raise _Refusal(400, "MissingDeviceToken", "no device token in :path")
        if not _TOKEN_RE.match(token) or len(token) % 2:
            raise _Refusal(400, "BadDeviceToken", "the device token is not hex")
        self._check_jwt(headers.get("authorization"))
        push_type = headers.get("apns-push-type")
        if push_type not in PUSH_TYPES:
            raise _Refusal(400, "InvalidPushType", f"apns-push-type {push_type!r}")
        topic = headers.get("apns-topic")
        if not topic:
            raise _Refusal(400, "MissingTopic", "no apns-topic")
        if topic not in (self.topic, f"{self.topic}.voip"):
            raise _Refusal(400, "TopicDisallowed", f"apns-topic {topic!r}")
        if (push_type == "voip") != topic.endswith(".voip"):
            raise _Refusal(400, "BadTopic", f"apns-topic {topic!r} for apns-push-type {push_type}")
        priority = headers.get("apns-priority", "10")  # Apple's default when absent
        allowed = {"background": ("5",), "voip": ("10",), "alert": ("5", "10")}[push_type]
        if priority not in allowed:
            raise _Refusal(400, "BadPriority", f"apns-priority {priority} for apns-push-type {push_type}")
        expiration = headers.get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            raise _Refusal(400, "BadExpirationDate", f"apns-expiration {expiration!r}")
        collapse = headers.get("apns-collapse-id")
        if collapse is not None and len(collapse.encode()) > MAX_COLLAPSE_ID:
            raise _Refusal(400, "BadCollapseId", f"apns-collapse-id of {len(collapse.encode())} bytes")
        if not body:
            raise _Refusal(400, "PayloadEmpty", "no payload")
        limit = MAX_VOIP_PAYLOAD if push_type == "voip" else MAX_PAYLOAD
        if len(body) > limit:
            raise _Refusal(413, "PayloadTooLarge", f"{len(body)} bytes, {limit} at most")
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            raise _Refusal(400, "BadPayload", "not a JSON object with an `aps` dictionary")  # (the fake's name)
        aps = payload["aps"]
        if push_type == "background":
            if aps.get("content-available") != 1:
                raise _Refusal(400, "BadPayload", "a background push without aps.content-available: 1")
            if any(key in aps for key in ("alert", "badge", "sound")):
                raise _Refusal(400, "BadPayload", "a background push with alert, badge or sound")
        if push_type == "alert" and "alert" not in aps:
            raise _Refusal(400, "BadPayload", "an alert push without aps.alert")

    def _check_jwt(self, authorization: str | None) -> None:
        if not authorization or authorization[:7].lower() != "bearer ":
            raise _Refusal(403, "MissingProviderToken", "no authorization: bearer <JWT>")
        token = authorization[7:]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"],
                                options={"verify_iat": False, "verify_exp": False, "require": ["iss", "iat"]})
        except jwt.PyJWTError as exc:
            raise _Refusal(403, "InvalidProviderToken", f"JWT: {exc}") from None
        if header.get("alg") != "ES256" or header.get("kid") != self.key_id:
            raise _Refusal(403, "InvalidProviderToken", f"JWT header {header}")
        if claims.get("iss") != self.team_id:
            raise _Refusal(403, "InvalidProviderToken", f"iss {claims.get('iss')!r}")
        iat = claims.get("iat")
        if not isinstance(iat, int):
            raise _Refusal(403, "InvalidProviderToken", f"iat {iat!r}")
        now = time.time()
        if iat > now + CLOCK_SKEW:
            raise _Refusal(403, "InvalidProviderToken", f"iat {iat - now:.0f} s in the future")
        if now - iat > TOKEN_MAX_AGE:
            raise _Refusal(403, "ExpiredProviderToken", f"iat {now - iat:.0f} s ago")

    def _error(self, reason: str, detail: str) -> None:
        with self._lock:
            self.errors.append(f"{reason}: {detail}")
