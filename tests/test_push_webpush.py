"""The Web Push provider against a local push service that decrypts and checks VAPID
(tests/fake_webpush.py): content-free payloads, headers, outcomes, timeouts, keys."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import re
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from config.settings import SettingsError
from kisse.push import egress, webpush
from kisse.push.egress import public_address
from kisse.push.provider import Result, Wake, retry_after
from kisse.push.webpush import WebPush, WebPushOff, parse_subscription, topic
from tests.conftest import with_settings
from tests.fake_webpush import FakeWebPush

pytestmark = pytest.mark.gen_test

WAKE = Wake("wake")
CALL = Wake("call", call_id="3f1c9a7e-call", urgent=True, ttl=45, collapse="call:3f1c9a7e-call")
SLACK = 5.0  # seconds: a slow 2-core CI machine


def pem_key(tmp_path, name="vapid.pem", fmt=serialization.PrivateFormat.PKCS8) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    return str(path)


@pytest.fixture
def key_file(tmp_path) -> str:
    return pem_key(tmp_path)


@contextlib.asynccontextmanager
async def webpush_against_fake(key_file: str, tls: bool = False, **changes):
    async with FakeWebPush(tls=tls) as fake:
        provider = WebPush(with_settings(push_vapid_private_key=key_file, push_timeout=changes.pop("push_timeout", 5.0),
                                         **changes))
        try:
            yield fake, provider
        finally:
            await provider.close()


def registration(sub: dict) -> dict:
    return {"provider": "webpush", **sub}


def assert_valid_vapid(push, fake: FakeWebPush, provider: WebPush, subject: str = "mailto:admin@localhost") -> None:
    assert push.error is None
    assert push.headers["Authorization"].startswith("vapid t=")
    assert push.vapid_key == provider.application_server_key()
    assert push.claims["aud"] == fake.origin
    assert push.claims["sub"] == subject
    assert time.time() < push.claims["exp"] <= time.time() + 24 * 3600


# -- what the device receives ------------------------------------------------

async def test_a_wake_decrypts_to_exactly_the_type_and_carries_the_headers(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
        result = await provider.send(registration(sub), WAKE)
        assert (result.outcome, result.status) == ("sent", 201)
        [push] = await fake.wait_for(sub, 1)
        assert push.payload == b'{"type": "wake"}'
        assert json.loads(push.payload) == {"type": "wake"}
        assert push.headers["Content-Encoding"] == "aes128gcm"
        assert push.headers["TTL"] == "3600"
        assert push.headers["Urgency"] == "normal"
        assert push.headers["Topic"] == topic("wake")
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", push.headers["Topic"])
        assert_valid_vapid(push, fake, provider)
        # The encrypted body is not the payload, and the payload is nowhere in clear.
        assert b"wake" not in push.body
        assert not any("wake" in value for name, value in push.headers.items() if name != "Topic")
        assert fake.errors == []


async def test_a_call_is_high_urgency_with_the_ring_ttl_and_only_the_call_id(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
        assert (await provider.send(registration(sub), CALL)).outcome == "sent"
        [push] = await fake.wait_for(sub, 1)
        assert json.loads(push.payload) == {"type": "call", "call_id": "3f1c9a7e-call"}
        assert push.headers["Urgency"] == "high"
        assert push.headers["TTL"] == "45"
        assert push.headers["Topic"] == topic("call:3f1c9a7e-call") != topic("wake")
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", push.headers["Topic"])
        assert "3f1c9a7e" not in push.headers["Topic"]
        assert_valid_vapid(push, fake, provider)
        # Stop the ringing: same collapse key, so the service keeps only this one.
        end = Wake("call_end", call_id="3f1c9a7e-call", urgent=True, ttl=45, collapse="call:3f1c9a7e-call")
        assert (await provider.send(registration(sub), end)).outcome == "sent"
        pushes = await fake.wait_for(sub, 2)
        assert json.loads(pushes[1].payload) == {"type": "call_end", "call_id": "3f1c9a7e-call"}
        assert pushes[1].headers["Topic"] == pushes[0].headers["Topic"]
        assert fake.errors == []


async def test_each_push_is_encrypted_afresh(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
        for _ in range(2):
            assert (await provider.send(registration(sub), WAKE)).outcome == "sent"
        first, second = await fake.wait_for(sub, 2)
        assert first.payload == second.payload
        assert first.body != second.body
        assert first.body[:16] != second.body[:16]     # salt
        assert first.body[21:86] != second.body[21:86]  # ephemeral sender key
        # One JWT per push service origin, reused while it is valid.
        assert first.headers["Authorization"] == second.headers["Authorization"]


async def test_the_application_server_key_is_the_key_that_signs(key_file, tmp_path):
    async with webpush_against_fake(key_file) as (fake, provider):
        key = provider.application_server_key()
        raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
        assert "=" not in key and len(raw) == 65 and raw[0] == 4
        pem_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        with open(key_file, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), None)
        assert pem_public.public_numbers() == private.public_key().public_numbers()
        # A subscription made with this key takes its pushes ...
        sub = fake.subscribe(application_server_key=key)
        assert (await provider.send(registration(sub), WAKE)).outcome == "sent"
        # ... and refuses another server's, as a real push service does (403).
        other = WebPush(with_settings(push_vapid_private_key=pem_key(tmp_path, "other.pem")))
        try:
            result = await other.send(registration(sub), WAKE)
        finally:
            await other.close()
        assert (result.outcome, result.status) == ("failed", 403)
        assert fake.errors == ["VAPID key is not the application server key of the subscription"]
        assert len(fake.received(sub)) == 1


async def test_the_subject_setting_is_the_jwt_sub(key_file):
    async with webpush_against_fake(key_file, push_vapid_subject="https://kisse.example.org") as (fake, provider):
        sub = fake.subscribe()
        assert (await provider.send(registration(sub), WAKE)).outcome == "sent"
        [push] = await fake.wait_for(sub, 1)
        assert_valid_vapid(push, fake, provider, subject="https://kisse.example.org")


async def test_over_https_trusting_the_ca_file(key_file):
    async with FakeWebPush(tls=True) as fake:
        sub = fake.subscribe()
        assert sub["endpoint"].startswith("https://localhost:")
        trusting = WebPush(with_settings(push_vapid_private_key=key_file, push_ca_file=fake.ca_file))
        distrusting = WebPush(with_settings(push_vapid_private_key=key_file, push_timeout=5.0))
        try:
            assert (await trusting.send(registration(sub), WAKE)).outcome == "sent"
            [push] = await fake.wait_for(sub, 1)
            assert json.loads(push.payload) == {"type": "wake"}
            assert push.claims["aud"] == fake.origin
            # An unknown CA is a connection error: retry, never a silent send.
            assert (await distrusting.send(registration(sub), WAKE)).outcome == "retry"
            assert len(fake.received(sub)) == 1
        finally:
            await trusting.close()
            await distrusting.close()


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


async def test_in_production_a_name_that_resolves_to_a_private_address_is_never_reached(key_file, no_proxy_env):
    """`localhost` is a name (registration refuses literal addresses only): the
    connection resolves it, finds 127.0.0.1 and refuses, and the subscription is
    dropped. The same push in development reaches the fake (the test above)."""
    async with FakeWebPush(tls=True) as fake:
        sub = fake.subscribe()
        assert sub["endpoint"].startswith("https://localhost:")
        provider = WebPush(with_settings(env="production", push_vapid_private_key=key_file, push_ca_file=fake.ca_file))
        try:
            assert await provider.send(registration(sub), WAKE) == Result("dead", reason="endpoint_not_public")
            await asyncio.sleep(0.2)
            assert fake.pushes == []
        finally:
            await provider.close()


async def test_in_production_a_public_address_is_reached_through_the_checked_connection(key_file, no_proxy_env,
                                                                                     monkeypatch):
    """The guarded path itself delivers (resolution, connect to the checked address,
    TLS verified against the name): loopback counts as public for this test only."""
    monkeypatch.setattr(egress, "public_address", lambda address: True)
    async with FakeWebPush(tls=True) as fake:
        sub = fake.subscribe()
        provider = WebPush(with_settings(env="production", push_vapid_private_key=key_file, push_ca_file=fake.ca_file))
        try:
            assert (await provider.send(registration(sub), WAKE)).outcome == "sent"
            [push] = await fake.wait_for(sub, 1)
            assert json.loads(push.payload) == {"type": "wake"}
        finally:
            await provider.close()


def test_public_addresses_are_global_unicast_only():
    for address in ("93.184.216.34", "2606:4700:4700::1111", "8.8.8.8", "64:ff9b::808:808", "::ffff:8.8.8.8"):
        assert public_address(address), address
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "224.0.0.1", "::1", "fe80::1%eth0", "fc00::1", "::ffff:10.0.0.1",
                    "::ffff:127.0.0.1", "ff02::1",
                    "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "::a00:1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"):
        assert not public_address(address), address


# -- what the push service answers ----------------------------------------------

async def test_gone_and_unknown_subscriptions_are_dead(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        unsubscribed = fake.subscribe()
        fake.unsubscribe(unsubscribed)
        result = await provider.send(registration(unsubscribed), WAKE)
        assert (result.outcome, result.status) == ("dead", 410)
        unknown = {"endpoint": fake.origin + "/wpush/no-such-subscription", "keys": fake.subscribe()["keys"]}
        result = await provider.send(registration(unknown), WAKE)
        assert (result.outcome, result.status) == ("dead", 404)
        scripted = fake.subscribe()
        fake.answer(scripted, 410)
        assert (await provider.send(registration(scripted), CALL)).outcome == "dead"
        assert fake.errors == []


async def test_429_is_retried_after_what_retry_after_says(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
        fake.answer(sub, 429, times=2, retry_after=7)
        for _ in range(2):
            result = await provider.send(registration(sub), WAKE)
            assert (result.outcome, result.status, result.retry_after) == ("retry", 429, 7.0)
        assert (await provider.send(registration(sub), WAKE)).outcome == "sent"
        assert len(fake.attempts(sub)) == 3 and len(fake.received(sub)) == 1
        # An HTTP date works too.
        fake.answer(sub, 429, times=1, retry_after=email.utils.formatdate(time.time() + 120, usegmt=True))
        result = await provider.send(registration(sub), WAKE)
        assert result.outcome == "retry" and 100 <= result.retry_after <= 121
        fake.answer(sub, 429, times=1)
        result = await provider.send(registration(sub), WAKE)
        assert (result.outcome, result.retry_after) == ("retry", None)


async def test_5xx_is_retried(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
        fake.answer(sub, 500, times=1)
        fake.answer(sub, 503, times=1, retry_after=30)
        result = await provider.send(registration(sub), WAKE)
        assert (result.outcome, result.status, result.retry_after) == ("retry", 500, None)
        result = await provider.send(registration(sub), WAKE)
        assert (result.outcome, result.status, result.retry_after) == ("retry", 503, 30.0)
        assert (await provider.send(registration(sub), WAKE)).outcome == "sent"


@pytest.mark.parametrize("status", [400, 401, 403, 413])
async def test_refusals_retrying_will_not_mend_fail_with_the_reason(key_file, status):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
        fake.answer(sub, status)
        result = await provider.send(registration(sub), WAKE)
        assert (result.outcome, result.status) == ("failed", status)
        assert result.reason.startswith(str(status)) and len(result.reason) > 4


async def test_a_hanging_push_service_is_a_retry_within_the_timeout(key_file):
    async with webpush_against_fake(key_file, push_timeout=0.5) as (fake, provider):
        sub = fake.subscribe()
        fake.hang(sub, 30, times=1)
        started = time.monotonic()
        result = await provider.send(registration(sub), CALL)
        elapsed = time.monotonic() - started
        assert (result.outcome, result.reason) == ("retry", "timeout")
        assert 0.4 <= elapsed < 0.5 + SLACK
        [held] = fake.attempts(sub)
        assert held.error is None
        assert fake.received(sub) == []
        # The next push, no longer held, goes through on the same provider.
        assert (await provider.send(registration(sub), CALL)).outcome == "sent"


async def test_a_push_service_that_trickles_its_answer_is_cut_at_the_timeout(key_file):
    """httpx's timeouts are per read; ours bounds the whole request."""
    import tornado.httpserver
    import tornado.netutil
    import tornado.web
    import asyncio

    class Trickle(tornado.web.RequestHandler):
        async def post(self):
            self.set_status(201)
            for _ in range(40):
                self.write(b"x")
                await self.flush()
                await asyncio.sleep(0.1)

    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([("/p", Trickle)]))
    server.add_sockets([sock])
    async with webpush_against_fake(key_file, push_timeout=0.5) as (fake, provider):
        sub = {**fake.subscribe(), "endpoint": f"http://127.0.0.1:{sock.getsockname()[1]}/p"}
        started = time.monotonic()
        result = await provider.send(registration(sub), WAKE)
        assert result.outcome == "retry"
        assert time.monotonic() - started < 0.5 + SLACK
    server.stop()
    await server.close_all_connections()


async def test_a_refused_connection_is_a_retry(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
    # The fake has stopped: nothing listens there any more.
    async with webpush_against_fake(key_file) as (_, provider):
        result = await provider.send(registration(sub), WAKE)
        assert result.outcome == "retry" and result.status is None


# -- registrations, keys, settings, logs ----------------------------------------

async def test_an_unusable_registration_is_dead_without_a_request(key_file):
    async with webpush_against_fake(key_file) as (fake, provider):
        sub = fake.subscribe()
        for broken in ({**sub, "keys": {**sub["keys"], "auth": "c2hvcnQ"}},
                       {**sub, "keys": {**sub["keys"], "p256dh": "bm90IGEga2V5"}},
                       {**sub, "keys": {"auth": sub["keys"]["auth"]}},
                       {**sub, "endpoint": "ftp://example.org/x"},
                       {"endpoint": sub["endpoint"]}):
            result = await provider.send(registration(broken), WAKE)
            assert (result.outcome, result.reason) == ("dead", "invalid_subscription")
        assert fake.attempts() == []


def test_parse_subscription_says_what_is_wrong_and_wants_https_in_production():
    key = base64.urlsafe_b64encode(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)).rstrip(b"=").decode()
    keys = {"p256dh": key, "auth": "AAAAAAAAAAAAAAAAAAAAAA"}
    parsed = parse_subscription({"endpoint": "https://Push.Example.org:443/wpush/abc", "keys": keys}, env="production")
    assert (parsed.host, parsed.audience) == ("push.example.org", "https://push.example.org")
    assert parse_subscription({"endpoint": "http://127.0.0.1:8081/x", "keys": keys}).audience == "http://127.0.0.1:8081"
    assert parse_subscription({"endpoint": "https://[::1]:9/x", "keys": keys}).audience == "https://[::1]:9"
    with pytest.raises(ValueError, match="https"):
        parse_subscription({"endpoint": "http://push.example.org/x", "keys": keys}, env="production")
    with pytest.raises(ValueError, match="user info"):
        parse_subscription({"endpoint": "https://u:p@push.example.org/x", "keys": keys})
    with pytest.raises(ValueError, match="auth") as raised:
        parse_subscription({"endpoint": "https://push.example.org/x", "keys": {**keys, "auth": "AAAA"}})
    assert "AAAA" not in str(raised.value)


def test_retry_after_and_topic():
    assert retry_after("120") == 120.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412380.0) == 100.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    # A server the client chose cannot hold the device's wake-ups back for ever.
    assert retry_after("inf") is None and retry_after("nan") is None and retry_after("1e400") is None
    assert retry_after("99999999") == retry_after("Fri, 01 Jan 9999 00:00:00 GMT") == 3600.0
    for key in ("wake", "call:" + "x" * 300, "ünïcode key"):
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", topic(key))
    assert topic("a") == topic("a") != topic("b")


async def test_key_file_formats(tmp_path):
    sec1 = pem_key(tmp_path, "sec1.pem", serialization.PrivateFormat.TraditionalOpenSSL)
    raw_key = ec.generate_private_key(ec.SECP256R1())
    raw = tmp_path / "raw.txt"
    raw.write_text(base64.urlsafe_b64encode(raw_key.private_numbers().private_value.to_bytes(32, "big"))
                   .rstrip(b"=").decode() + "\n")
    expected = base64.urlsafe_b64encode(raw_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)).rstrip(b"=").decode()
    async with webpush_against_fake(sec1) as (fake, provider):
        sub = fake.subscribe(application_server_key=provider.application_server_key())
        assert (await provider.send(registration(sub), WAKE)).outcome == "sent"
    async with webpush_against_fake(str(raw)) as (fake, provider):
        assert provider.application_server_key() == expected
        sub = fake.subscribe(application_server_key=expected)
        assert (await provider.send(registration(sub), WAKE)).outcome == "sent"


def test_an_unusable_key_file_is_a_settings_error_not_a_new_key(tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(SettingsError, match="KISSE_PUSH_VAPID_PRIVATE_KEY"):
        WebPush(with_settings(push_vapid_private_key=str(missing)))
    assert not missing.exists()  # py-vapid's from_file would have written one there
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SettingsError, match="KISSE_PUSH_VAPID_PRIVATE_KEY"):
        WebPush(with_settings(push_vapid_private_key=str(garbage)))
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(SettingsError, match="P-256"):
        WebPush(with_settings(push_vapid_private_key=str(p384)))
    with pytest.raises(SettingsError, match="KISSE_PUSH_VAPID_SUBJECT"):
        WebPush(with_settings(push_vapid_private_key=pem_key(tmp_path), push_vapid_subject="admin"))
    with pytest.raises(SettingsError, match="KISSE_PUSH_CA_FILE"):
        WebPush(with_settings(push_vapid_private_key=pem_key(tmp_path, "k2.pem"),
                              push_ca_file=str(tmp_path / "no-ca.pem")))


async def test_development_generates_a_key_once_with_a_warning_production_turns_web_push_off(monkeypatch, caplog):
    monkeypatch.setattr(webpush, "_generated", None)
    caplog.set_level(logging.WARNING, logger="kisse.push.webpush")
    development = with_settings(env="development", push_vapid_private_key="")
    assert WebPush.enabled(development)
    first, second = WebPush(development), WebPush(development)
    try:
        assert first.application_server_key() == second.application_server_key()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [webpush.GENERATED_KEY_WARNING]
        assert warnings[0] == ("KISSE_PUSH_VAPID_PRIVATE_KEY is not set: a generated VAPID key, "
                               "subscriptions will not survive a restart")
        async with FakeWebPush() as fake:
            sub = fake.subscribe(application_server_key=first.application_server_key())
            assert (await first.send(registration(sub), WAKE)).outcome == "sent"
    finally:
        await first.close()
        await second.close()
    production = with_settings(env="production", push_vapid_private_key="")
    assert not WebPush.enabled(production)
    with pytest.raises(WebPushOff, match="KISSE_PUSH_VAPID_PRIVATE_KEY"):
        WebPush(production)


async def test_logs_name_the_host_never_the_endpoint_or_keys(key_file, caplog):
    caplog.set_level(logging.DEBUG)
    async with webpush_against_fake(key_file, push_timeout=0.5) as (fake, provider):
        subs = [fake.subscribe() for _ in range(5)]
        fake.unsubscribe(subs[1])
        fake.answer(subs[2], 429, retry_after=3)
        fake.answer(subs[3], 403)
        fake.hang(subs[4], 30)
        outcomes = [(await provider.send(registration(sub), WAKE)).outcome for sub in subs]
        assert outcomes == ["sent", "dead", "retry", "failed", "retry"]
        broken = {**subs[0], "keys": {**subs[0]["keys"], "auth": "AAAA"}}
        assert (await provider.send(registration(broken), WAKE)).outcome == "dead"
    ours = [r for r in caplog.records if not r.name.startswith("tornado")]  # tornado's are the fake's
    text = " ".join(f"{r.getMessage()} {r.args}" for r in ours)
    assert "127.0.0.1" in text
    for sub in subs:
        assert sub["endpoint"].rsplit("/", 1)[-1] not in text
        assert sub["keys"]["p256dh"] not in text and sub["keys"]["auth"] not in text
    assert "/wpush/" not in text
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
