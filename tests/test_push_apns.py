"""The APNs provider against the fake APNs (tests/fake_apns.py): HTTP/2, the ES256
provider token, push types, priorities and topics, and what each answer means."""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from config.settings import Settings, SettingsError
from kisse.push.apns import APNs, collapse_id
from kisse.push.provider import Result, Wake
from tests.fake_apns import FakeAPNs

pytestmark = pytest.mark.gen_test(timeout=120)  # generous: a loaded 2-core CI machine is slow

TOKEN = "a1" * 32        # the device's APNs token (hex, 32 bytes)
VOIP = "b2" * 32         # its PushKit token
OTHER = "c3" * 32
REG = {"provider": "apns", "token": TOKEN, "voip_token": VOIP}
MESSAGE = Wake("wake", ttl=24 * 3600, collapse="wake")
CALL = Wake("call", call_id="call-0123456789abcdef", urgent=True, ttl=45, collapse="call-call-0123456789abcdef")
CALL_END = Wake("call_end", call_id="call-0123456789abcdef", urgent=True, ttl=60,
                collapse="call-call-0123456789abcdef")


def provider(fake: FakeAPNs, **overrides) -> APNs:
    return APNs(fake.settings(**{"push_timeout": 10.0, **overrides}))


async def test_message_wake_is_a_background_push(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            before = int(time.time())
            assert await apns.send(REG, MESSAGE) == Result("sent", status=200)
        finally:
            await apns.close()
        [push] = await fake.wait_for(TOKEN, 1)
        assert fake.attempts(VOIP) == []
        h = push.headers
        assert h[":method"] == "POST" and h[":path"] == f"/3/device/{TOKEN}" and h[":scheme"] == "https"
        assert h["apns-push-type"] == "background"
        assert h["apns-priority"] == "5"
        assert h["apns-topic"] == fake.topic
        assert h["apns-collapse-id"] == "wake"
        assert before + 24 * 3600 <= int(h["apns-expiration"]) <= int(time.time()) + 24 * 3600
        assert push.payload == {"aps": {"content-available": 1}, "type": "wake"}
        assert push.jwt_header == {"alg": "ES256", "kid": fake.key_id}
        assert push.jwt_claims["iss"] == fake.team_id and set(push.jwt_claims) == {"iss", "iat"}
        assert abs(push.jwt_claims["iat"] - time.time()) < 60
        assert fake.errors == []


async def test_call_is_a_voip_push_to_the_voip_token(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            before = int(time.time())
            assert (await apns.send(REG, CALL)).outcome == "sent"
        finally:
            await apns.close()
        [push] = await fake.wait_for(VOIP, 1)
        assert fake.attempts(TOKEN) == []
        h = push.headers
        assert h[":path"] == f"/3/device/{VOIP}"
        assert h["apns-push-type"] == "voip"
        assert h["apns-priority"] == "10"
        assert h["apns-topic"] == f"{fake.topic}.voip"
        assert h["apns-collapse-id"] == CALL.collapse
        assert before + 45 <= int(h["apns-expiration"]) <= int(time.time()) + 45
        assert h["authorization"].startswith("bearer ")
        assert push.payload == {"aps": {}, "type": "call", "call_id": CALL.call_id}
        assert fake.errors == []


async def test_call_end_and_a_call_without_voip_token_are_background_pushes(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            # A VoIP push must report a new call to CallKit: the end of one goes as a background push.
            assert (await apns.send(REG, CALL_END)).outcome == "sent"
            assert (await apns.send({"provider": "apns", "token": OTHER}, CALL)).outcome == "sent"
        finally:
            await apns.close()
        assert fake.attempts(VOIP) == []
        [end] = fake.received(TOKEN)
        assert end.payload == {"aps": {"content-available": 1}, "type": "call_end", "call_id": CALL.call_id}
        assert (end.push_type, end.priority, end.topic) == ("background", "5", fake.topic)
        [call] = fake.received(OTHER)
        assert call.payload == {"aps": {"content-available": 1}, "type": "call", "call_id": CALL.call_id}
        assert (call.push_type, call.priority, call.topic) == ("background", "5", fake.topic)
        assert fake.errors == []


async def test_a_registration_without_the_token_it_needs_fails(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            assert await apns.send({"provider": "apns"}, MESSAGE) == Result("failed", reason="no token")
            assert await apns.send({"provider": "apns", "voip_token": VOIP}, MESSAGE) == \
                Result("failed", reason="no token")
            assert await apns.send({"provider": "apns", "token": ""}, CALL) == Result("failed", reason="no token")
            bad = await apns.send({"provider": "apns", "token": "../../3/device/x?"}, MESSAGE)
            assert bad.outcome == "dead"
        finally:
            await apns.close()
        assert fake.attempts() == []


async def test_the_provider_token_is_reused(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            for _ in range(3):
                assert (await apns.send(REG, MESSAGE)).outcome == "sent"
            results = await asyncio.gather(*(apns.send(REG, CALL) for _ in range(10)),
                                           *(apns.send({"provider": "apns", "token": OTHER}, MESSAGE)
                                             for _ in range(10)))
            assert {r.outcome for r in results} == {"sent"}
        finally:
            await apns.close()
        assert len(fake.received()) == 23
        assert len(fake.provider_tokens) == 1  # one JWT for every push
        assert fake.connections == 1           # and one HTTP/2 connection
        assert fake.errors == []


async def test_the_provider_token_is_renewed_after_50_minutes(tmp_path):
    offset = [-55 * 60.0]  # the provider's clock starts 55 minutes behind: its first token is 55 minutes old soon

    async with FakeAPNs(tmp_path) as fake:
        apns = APNs(fake.settings(), clock=lambda: time.time() + offset[0])
        try:
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
            offset[0] = -55 * 60.0 + 19 * 60  # 19 minutes later: the same token
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
            assert len(fake.provider_tokens) == 1
            offset[0] = 0.0  # 55 minutes later: a new one (Apple refuses tokens older than an hour)
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
        finally:
            await apns.close()
        assert len(fake.provider_tokens) == 2
        iats = [p.jwt_claims["iat"] for p in fake.received(TOKEN)]
        assert iats[0] == iats[1] < iats[2] == iats[3]
        assert iats[2] - iats[0] >= 54 * 60
        assert fake.errors == []


async def test_expired_provider_token_signs_a_new_one_once(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
            fake.expire_provider_token(TOKEN)
            assert await apns.send(REG, MESSAGE) == Result("sent", status=200)
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
        finally:
            await apns.close()
        answers = [(p.status, p.reason) for p in fake.attempts(TOKEN)]
        assert answers == [(200, None), (403, "ExpiredProviderToken"), (200, None), (200, None)]
        first, refused, renewed, later = fake.attempts(TOKEN)
        assert refused.jwt == first.jwt and renewed.jwt != first.jwt and later.jwt == renewed.jwt
        assert len(fake.provider_tokens) == 2
        assert fake.errors == []


async def test_a_provider_token_refused_twice_fails(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            fake.respond(TOKEN, 403, "InvalidProviderToken", times=2)
            result = await apns.send(REG, MESSAGE)
            assert result == Result("failed", status=403, reason="InvalidProviderToken")
            assert len(fake.attempts(TOKEN)) == 2  # a new token, one more try, no more
            assert len({p.jwt for p in fake.attempts(TOKEN)}) == 2
        finally:
            await apns.close()


async def test_a_wrong_key_id_is_refused_and_fails(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake, push_apns_key_id="WRONGKEYID")
        try:
            assert await apns.send(REG, MESSAGE) == Result("failed", status=403, reason="InvalidProviderToken")
        finally:
            await apns.close()
        assert len(fake.attempts(TOKEN)) == 2 and fake.received() == []
        assert all(e.startswith("InvalidProviderToken") for e in fake.errors)


async def test_unregistered_and_bad_device_token_are_dead(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            fake.unregistered(TOKEN)
            assert await apns.send(REG, MESSAGE) == Result("dead", status=410, reason="Unregistered")
            fake.bad_device_token(VOIP)
            assert await apns.send(REG, CALL) == Result("dead", status=400, reason="BadDeviceToken")
            fake.respond(OTHER, 400, "DeviceTokenNotForTopic")
            assert await apns.send({"provider": "apns", "token": OTHER}, MESSAGE) == \
                Result("dead", status=400, reason="DeviceTokenNotForTopic")
        finally:
            await apns.close()
        assert fake.received() == []
        assert fake.errors == []


async def test_too_many_requests_is_retried(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            fake.too_many_requests(TOKEN, times=2, retry_after=7)
            assert await apns.send(REG, MESSAGE) == Result("retry", status=429, retry_after=7.0,
                                                           reason="TooManyRequests")
            fake.respond(TOKEN, 429, "TooManyRequests")  # Apple sends no Retry-After, usually
            assert await apns.send(REG, MESSAGE) == Result("retry", status=429, reason="TooManyRequests",
                                                           retry_after=7.0)
            assert await apns.send(REG, MESSAGE) == Result("retry", status=429, reason="TooManyRequests")
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
        finally:
            await apns.close()
        assert [p.status for p in fake.attempts(TOKEN)] == [429, 429, 429, 200]


async def test_server_errors_are_retried(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            fake.server_error(TOKEN)
            assert await apns.send(REG, MESSAGE) == Result("retry", status=500, reason="InternalServerError")
            fake.server_error(TOKEN, status=503)
            assert await apns.send(REG, MESSAGE) == Result("retry", status=503, reason="ServiceUnavailable")
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
        finally:
            await apns.close()


async def test_other_client_errors_fail_with_the_reason(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            fake.respond(TOKEN, 413, "PayloadTooLarge")
            assert await apns.send(REG, MESSAGE) == Result("failed", status=413, reason="PayloadTooLarge")
            fake.respond(TOKEN, 403, "Forbidden")
            assert await apns.send(REG, MESSAGE) == Result("failed", status=403, reason="Forbidden")
            assert len(fake.attempts(TOKEN)) == 2  # Forbidden is no provider-token problem: no second try
            fake.respond(TOKEN, 400, "BadCollapseId")
            assert await apns.send(REG, MESSAGE) == Result("failed", status=400, reason="BadCollapseId")
        finally:
            await apns.close()


async def test_a_hanging_server_is_a_retry_within_the_timeout(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake, push_timeout=1.0)
        try:
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"  # connected
            fake.hang(TOKEN, 60)
            started = time.monotonic()
            result = await apns.send(REG, MESSAGE)
            elapsed = time.monotonic() - started
            assert result == Result("retry", reason="timeout")
            assert 0.9 <= elapsed < 1.0 * 1.5 + 2.0  # the timeout, give or take a slow machine
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"  # and it pushes again after
        finally:
            await apns.close()


async def test_one_stream_hanging_on_a_busy_connection_is_a_retry_and_the_others_go_on(tmp_path):
    """Answers on other streams keep the connection's reads going (no read timeout):
    the whole-request deadline still ends the hanging one, and the connection lives on."""
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake, push_timeout=1.0)
        try:
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
            fake.hang(TOKEN, 60)
            started = time.monotonic()
            hanging = asyncio.ensure_future(apns.send(REG, MESSAGE))
            others = []
            while not hanging.done() and time.monotonic() - started < 10:
                others.append(await apns.send({"provider": "apns", "token": OTHER}, MESSAGE))
                await asyncio.sleep(0.1)
            assert await hanging == Result("retry", reason="timeout")
            assert time.monotonic() - started < 1.0 * 1.5 + 2.0
            assert len(others) >= 3 and {r.outcome for r in others} == {"sent"}
            assert (await apns.send(REG, MESSAGE)).outcome == "sent"
        finally:
            await apns.close()


async def test_a_server_that_is_not_there_is_a_retry(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake, push_apns_url=f"https://127.0.0.1:{port}")
        try:
            result = await apns.send(REG, MESSAGE)
        finally:
            await apns.close()
    assert result.outcome == "retry" and result.status is None


async def test_a_server_with_an_untrusted_certificate_is_not_pushed_to(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake, push_ca_file="")
        try:
            result = await apns.send(REG, MESSAGE)
        finally:
            await apns.close()
        assert result.outcome == "retry" and fake.attempts() == []


async def test_a_long_collapse_key_is_hashed_to_apples_limit(tmp_path):
    long = Wake("wake", collapse="x" * 100)
    assert collapse_id("wake") == "wake"
    assert len(collapse_id("x" * 100)) == 64 and collapse_id("x" * 100) != collapse_id("x" * 99)
    assert len(collapse_id("é")) == 64
    assert collapse_id("") is None
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake)
        try:
            assert (await apns.send(REG, long)).outcome == "sent"
            assert (await apns.send(REG, Wake("wake", collapse=""))).outcome == "sent"
        finally:
            await apns.close()
        first, second = fake.received(TOKEN)
        assert first.headers["apns-collapse-id"] == collapse_id("x" * 100)
        assert "apns-collapse-id" not in second.headers
        assert fake.errors == []


async def test_tokens_are_never_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with FakeAPNs(tmp_path) as fake:
        apns = provider(fake, push_timeout=1.0)
        try:
            fake.unregistered(OTHER)
            fake.server_error(TOKEN)
            fake.hang(VOIP, 30)
            await apns.send(REG, MESSAGE)
            await apns.send(REG, CALL)
            await apns.send({"provider": "apns", "token": OTHER}, MESSAGE)
            await apns.send({"provider": "apns", "token": "zz" * 32}, MESSAGE)
            jwt_text = fake.attempts()[0].jwt
        finally:
            await apns.close()
    assert caplog.records
    for secret in (TOKEN, VOIP, OTHER, "zz" * 32, jwt_text):
        assert secret not in caplog.text


def test_enabled_needs_key_key_id_team_id_and_topic(tmp_path):
    fake = FakeAPNs(tmp_path)
    assert not APNs.enabled(Settings())
    assert APNs.enabled(fake.settings())
    for field in ("push_apns_key", "push_apns_key_id", "push_apns_team_id", "push_apns_topic"):
        assert not APNs.enabled(fake.settings(**{field: ""}))


def test_an_unusable_key_is_a_settings_error(tmp_path):
    fake = FakeAPNs(tmp_path)
    with pytest.raises(SettingsError, match="KISSE_PUSH_APNS_KEY"):
        APNs(fake.settings(push_apns_key=str(tmp_path / "missing.p8")))
    (tmp_path / "not-a-key.p8").write_text("hello")
    with pytest.raises(SettingsError, match="KISSE_PUSH_APNS_KEY"):
        APNs(fake.settings(push_apns_key=str(tmp_path / "not-a-key.p8")))
    from cryptography.hazmat.primitives import serialization
    other = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "p384.p8").write_bytes(other)
    with pytest.raises(SettingsError, match="P-256"):
        APNs(fake.settings(push_apns_key=str(tmp_path / "p384.p8")))
    with pytest.raises(SettingsError, match="KISSE_PUSH_CA_FILE"):
        APNs(fake.settings(push_ca_file=str(tmp_path / "missing.pem")))


# -- the fake itself refuses what Apple refuses -----------------------------------------------

def _good_jwt(fake: FakeAPNs, **claims) -> str:
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(open(fake.key_file, "rb").read(), password=None)
    return jwt.encode({"iss": fake.team_id, "iat": int(time.time()), **claims}, key, algorithm="ES256",
                      headers={"kid": fake.key_id})


async def test_the_fake_checks_what_apple_checks(tmp_path):
    async with FakeAPNs(tmp_path) as fake:
        good = {"authorization": f"bearer {_good_jwt(fake)}", "apns-topic": fake.topic,
                "apns-push-type": "background", "apns-priority": "5"}
        body = b'{"aps":{"content-available":1}}'
        stranger = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode({"iss": fake.team_id, "iat": int(time.time())}, stranger, algorithm="ES256",
                            headers={"kid": fake.key_id})
        cases = [
            ({}, body, 200, None),
            ({"apns-priority": "10"}, body, 400, "BadPriority"),
            ({"apns-push-type": "voip"}, body, 400, "BadTopic"),
            ({"apns-push-type": "voip", "apns-topic": f"{fake.topic}.voip", "apns-priority": "10"},
             b'{"aps":{}}', 200, None),
            ({"apns-push-type": "voip", "apns-topic": f"{fake.topic}.voip", "apns-priority": "5"},
             b'{"aps":{}}', 400, "BadPriority"),
            ({"apns-topic": f"{fake.topic}.voip"}, body, 400, "BadTopic"),
            ({"apns-topic": "com.example.other"}, body, 400, "TopicDisallowed"),
            ({"apns-push-type": "pigeon"}, body, 400, "InvalidPushType"),
            ({"apns-collapse-id": "x" * 65}, body, 400, "BadCollapseId"),
            ({"apns-expiration": "soon"}, body, 400, "BadExpirationDate"),
            ({}, b"", 400, "PayloadEmpty"),
            ({}, b'{"aps":{"content-available":1},"pad":"' + b"x" * 4096 + b'"}', 413, "PayloadTooLarge"),
            ({}, b'{"type":"wake"}', 400, "BadPayload"),
            ({}, b'{"aps":{"content-available":1,"alert":"hi"}}', 400, "BadPayload"),
            ({"authorization": ""}, body, 403, "MissingProviderToken"),
            ({"authorization": f"bearer {forged}"}, body, 403, "InvalidProviderToken"),
            ({"authorization": f"bearer {_good_jwt(fake, iss='SOMEONEELS')}"}, body, 403, "InvalidProviderToken"),
            ({"authorization": f"bearer {_good_jwt(fake, iat=int(time.time()) - 3700)}"}, body, 403,
             "ExpiredProviderToken"),
        ]
        trust = ssl.create_default_context(cafile=fake.ca_file)
        async with httpx.AsyncClient(http1=False, http2=True, verify=trust) as client:
            for extra, content, status, reason in cases:
                headers = {k: v for k, v in {**good, **extra}.items() if v}
                response = await client.post(f"{fake.url}/3/device/{TOKEN}", headers=headers, content=content)
                assert response.http_version == "HTTP/2"
                assert (response.status_code, response.json().get("reason") if response.content else None) == \
                    (status, reason), extra
                assert response.headers["apns-id"]
            response = await client.post(f"{fake.url}/3/device/not-hex", headers=good, content=body)
            assert (response.status_code, response.json()["reason"]) == (400, "BadDeviceToken")
            response = await client.get(f"{fake.url}/3/device/{TOKEN}", headers=good)
            assert (response.status_code, response.json()["reason"]) == (405, "MethodNotAllowed")
        assert len(fake.errors) == len([c for c in cases if c[2] != 200]) + 2
        async with httpx.AsyncClient(verify=trust) as http1:  # HTTP/1.1 only: refused
            with pytest.raises(httpx.HTTPError):
                await http1.post(f"{fake.url}/3/device/{TOKEN}", headers=good, content=body)
        assert fake.errors[-1].startswith("NotHTTP2")


async def test_the_fake_serves_from_a_thread_too(tmp_path):
    with FakeAPNs(tmp_path) as fake:
        assert set(fake.env()) == {"KISSE_PUSH_APNS_KEY", "KISSE_PUSH_APNS_KEY_ID", "KISSE_PUSH_APNS_TEAM_ID",
                                   "KISSE_PUSH_APNS_TOPIC", "KISSE_PUSH_APNS_URL", "KISSE_PUSH_CA_FILE"}
        apns = provider(fake)
        try:
            assert (await apns.send(REG, CALL)).outcome == "sent"
        finally:
            await apns.close()
        [push] = await fake.wait_for(VOIP, 1, timeout=30)
        assert push.payload == {"aps": {}, "type": "call", "call_id": CALL.call_id}
        assert await asyncio.to_thread(fake.wait_for_sync, VOIP, 1, 30)
        with pytest.raises(AssertionError, match="0 of 1 pushes"):
            await fake.wait_for(TOKEN, 1, timeout=0.2)
