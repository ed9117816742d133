"""The FCM HTTP v1 provider against a local fake of FCM and Google's token endpoint
(tests/fake_fcm.py): the OAuth2 flow, the content-free message, what each answer means."""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
import time

import pytest

from kisse.push.fcm import FCM
from kisse.push.provider import Wake
from tests.conftest import with_settings
from tests.fake_fcm import FakeFCM

pytestmark = pytest.mark.gen_test(timeout=120)

MESSAGE = Wake("wake", ttl=24 * 3600, collapse="wake")
CALL = Wake("call", call_id="3f2b9c4e-call", urgent=True, ttl=45, collapse="call-3f2b9c4e-call")
CALL_END = Wake("call_end", call_id="3f2b9c4e-call", urgent=True, ttl=45, collapse="call-3f2b9c4e-call")


def registration(token: str) -> dict[str, str]:
    return {"provider": "fcm", "token": token}


async def provider(fake: FakeFCM, tmp_path, **changes) -> FCM:
    return FCM(with_settings(**{**fake.settings(tmp_path), **changes}))


async def test_a_wake_and_a_call_are_content_free_data_messages(tmp_path):
    async with FakeFCM() as fake:
        fcm = await provider(fake, tmp_path)
        try:
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"
            result = await fcm.send(registration("phone-A"), CALL)
            assert (result.outcome, result.status) == ("sent", 200)
            assert (await fcm.send(registration("phone-A"), CALL_END)).outcome == "sent"
        finally:
            await fcm.close()
        wake, call, end = fake.received("phone-A")
        assert wake == {"message": {"token": "phone-A", "data": {"type": "wake"},
                                    "android": {"priority": "NORMAL", "ttl": "86400s", "collapse_key": "wake"}}}
        assert call == {"message": {"token": "phone-A", "data": {"type": "call", "call_id": "3f2b9c4e-call"},
                                    "android": {"priority": "HIGH", "ttl": "45s",
                                                "collapse_key": "call-3f2b9c4e-call"}}}
        assert end["message"]["data"] == {"type": "call_end", "call_id": "3f2b9c4e-call"}
        assert end["message"]["android"]["priority"] == "HIGH"
        # Nothing else travels: no notification block, no other key anywhere.
        for body in (wake, call, end):
            assert set(body["message"]) == {"token", "data", "android"}
        sends = [r for r in fake.requests if r["status"] == 200]
        assert all(r["project"] == fake.project_id for r in sends)
        assert all(r["headers"]["Authorization"].removeprefix("Bearer ") in fake.issued for r in sends)
        assert all(r["headers"]["Content-Type"].startswith("application/json") for r in sends)
        # The grant google-auth made, as Google's endpoint checks it.
        (claims,) = fake.assertions
        assert claims["iss"] == fake.client_email
        assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
        assert claims["exp"] - claims["iat"] <= 3600
        assert fake.token_refusals == []


async def test_one_oauth_token_for_many_sends_and_a_new_one_after_it_expires(tmp_path):
    async with FakeFCM(token_lifetime=3) as fake:
        fcm = await provider(fake, tmp_path)
        try:
            tokens = [f"phone-{n}" for n in range(25)]
            results = await asyncio.gather(*(fcm.send(registration(t), MESSAGE) for t in tokens))
            assert {r.outcome for r in results} == {"sent"}
            results = await asyncio.gather(*(fcm.send(registration(t), CALL) for t in tokens))
            assert {r.outcome for r in results} == {"sent"}
            assert fake.token_requests == 1 and fcm.token_refreshes == 1  # concurrent sends shared one refresh
            await asyncio.sleep(3.5)  # the token has expired (the fake would answer 401 to it)
            assert (await fcm.send(registration("phone-0"), MESSAGE)).outcome == "sent"
            assert fake.token_requests == 2
            assert len(fake.issued) == 2
            assert all(r["status"] == 200 for r in fake.requests)  # renewed before use, never a 401
            assert (await fcm.send(registration("phone-1"), MESSAGE)).outcome == "sent"
            assert fake.token_requests == 2
        finally:
            await fcm.close()


async def test_the_token_request_never_blocks_the_loop(tmp_path):
    async with FakeFCM() as fake:
        fake.token_delay = 1.5  # were the refresh on the loop, the fake (on the same loop) could never answer
        fcm = await provider(fake, tmp_path)
        gaps: list[float] = []

        async def tick():
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        try:
            started = time.monotonic()
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"
            assert time.monotonic() - started >= 1.4
        finally:
            ticker.cancel()
            await fcm.close()
        assert len(gaps) > 20 and max(gaps) < 0.5


async def test_unregistered_and_bad_tokens_are_dead_other_400s_are_not(tmp_path):
    async with FakeFCM() as fake:
        fcm = await provider(fake, tmp_path)
        try:
            fake.unregister("uninstalled")
            result = await fcm.send(registration("uninstalled"), MESSAGE)
            assert (result.outcome, result.status, result.reason) == ("dead", 404, "UNREGISTERED")
            fake.invalidate("garbled")
            result = await fcm.send(registration("garbled"), MESSAGE)
            assert (result.outcome, result.status, result.reason) == ("dead", 400, "INVALID_ARGUMENT")
            # A 400 about the message (here an empty collapse key), not the token: the registration stays.
            result = await fcm.send(registration("phone-A"), Wake("wake", collapse=""))
            assert (result.outcome, result.status) == ("failed", 400)
            assert (await fcm.send({"provider": "fcm"}, MESSAGE)).outcome == "dead"
            assert fake.received("uninstalled") == fake.received("garbled") == []
        finally:
            await fcm.close()


async def test_429_is_retried_after_what_retry_after_says(tmp_path):
    async with FakeFCM() as fake:
        fcm = await provider(fake, tmp_path)
        try:
            fake.throttle("phone-A", times=1, retry_after="7")
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert (result.outcome, result.status, result.retry_after, result.reason) == \
                ("retry", 429, 7.0, "QUOTA_EXCEEDED")
            fake.throttle("phone-A", times=1, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert result.outcome == "retry" and 25 <= result.retry_after <= 30
            fake.throttle("phone-A", times=1, retry_after=None)
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert (result.outcome, result.retry_after) == ("retry", None)
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"
            assert fake.attempts("phone-A") == 4 and len(fake.received("phone-A")) == 1
        finally:
            await fcm.close()


async def test_server_errors_are_retried(tmp_path):
    async with FakeFCM() as fake:
        fcm = await provider(fake, tmp_path)
        try:
            fake.fail("phone-A", times=1, status=500)
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert (result.outcome, result.status, result.retry_after) == ("retry", 500, None)
            fake.fail("phone-A", times=1, status=503, retry_after="2")
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert (result.outcome, result.status, result.retry_after, result.reason) == \
                ("retry", 503, 2.0, "UNAVAILABLE")
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"
        finally:
            await fcm.close()


async def test_a_hanging_send_is_a_retry_within_the_push_timeout(tmp_path):
    async with FakeFCM() as fake:
        fcm = await provider(fake, tmp_path, push_timeout=1.0)
        try:
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"  # token fetched
            fake.hang("phone-A", 30)
            started = time.monotonic()
            result = await fcm.send(registration("phone-A"), CALL)
            elapsed = time.monotonic() - started
            assert (result.outcome, result.reason) == ("retry", "timeout")
            assert 0.9 <= elapsed < 5, elapsed
            assert (await fcm.send(registration("phone-A"), CALL)).outcome == "sent"
            assert len(fake.received("phone-A")) == 2
        finally:
            await fcm.close()


async def test_an_unreachable_fcm_is_a_retry(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    closed_port = listener.getsockname()[1]
    listener.close()
    async with FakeFCM() as fake:
        fcm = await provider(fake, tmp_path, push_fcm_url=f"http://127.0.0.1:{closed_port}")
        try:
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert (result.outcome, result.reason) == ("retry", "unreachable")
        finally:
            await fcm.close()


async def test_a_401_gets_one_fresh_token_and_one_more_try(tmp_path):
    async with FakeFCM() as fake:
        fcm = await provider(fake, tmp_path)
        try:
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"
            assert fake.token_requests == 1
            fake.unauthorize("phone-A", times=1)
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"
            assert fake.token_requests == 2 and fake.attempts("phone-A") == 3
            # Still refused with the fresh token: failed, after exactly one refresh.
            fake.unauthorize("phone-A", times=2)
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert (result.outcome, result.status) == ("failed", 401)
            assert fake.token_requests == 3 and fake.attempts("phone-A") == 5
            # Tokens revoked before their expiry: the 401 comes from the token check itself.
            fake.revoke_access_tokens()
            assert (await fcm.send(registration("phone-A"), MESSAGE)).outcome == "sent"
            assert fake.token_requests == 4 and len(fake.received("phone-A")) == 3
        finally:
            await fcm.close()


async def test_tls_with_the_extra_ca_and_not_without_it(tmp_path):
    async with FakeFCM(tls=True) as fake:
        fcm = await provider(fake, tmp_path)  # settings() includes push_ca_file
        try:
            assert (await fcm.send(registration("phone-A"), CALL)).outcome == "sent"
            assert fake.base_url.startswith("https://") and fake.token_requests == 1
        finally:
            await fcm.close()
        untrusting = await provider(fake, tmp_path, push_ca_file="")
        try:
            result = await untrusting.send(registration("phone-A"), CALL)
            assert (result.outcome, result.reason) == ("retry", "oauth unreachable")  # the token: TLS refused
        finally:
            await untrusting.close()
        assert len(fake.received("phone-A")) == 1


async def test_a_service_account_google_refuses_fails_the_push(tmp_path):
    async with FakeFCM() as fake:
        impostor = FakeFCM()  # same project and email, another private key
        info = fake.service_account()
        info["private_key"] = impostor.service_account()["private_key"]
        path = tmp_path / "impostor.json"
        path.write_text(json.dumps(info))
        fcm = FCM(with_settings(push_fcm_credentials=str(path), push_fcm_url=fake.base_url))
        try:
            result = await fcm.send(registration("phone-A"), MESSAGE)
            assert (result.outcome, result.reason) == ("failed", "oauth invalid_grant")
            assert fake.token_refusals and "invalid_grant" in fake.token_refusals[0]
            assert fake.requests == []
        finally:
            await fcm.close()


async def test_enabled_and_broken_credentials(tmp_path):
    assert not FCM.enabled(with_settings())
    assert FCM.enabled(with_settings(push_fcm_credentials="/etc/kisse/fcm.json"))
    with pytest.raises(ValueError, match="not a readable JSON"):
        FCM(with_settings(push_fcm_credentials=str(tmp_path / "missing.json")))
    (tmp_path / "half.json").write_text(json.dumps({"type": "service_account", "project_id": "p"}))
    with pytest.raises(ValueError, match="missing client_email, private_key"):
        FCM(with_settings(push_fcm_credentials=str(tmp_path / "half.json")))
    assert FCM.name == "fcm"


async def test_no_token_is_ever_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with FakeFCM(token_lifetime=2) as fake:
        fcm = await provider(fake, tmp_path, push_timeout=1.0)
        secret = "fcm-registration-token-do-not-log"
        try:
            fake.unauthorize(secret, times=2)
            fake.fail(secret, status=500)
            fake.throttle(secret, retry_after="1")
            fake.hang(secret, 10)
            fake.invalidate("fcm-invalid-token-do-not-log")
            for _ in range(5):
                await fcm.send(registration(secret), CALL)
            await fcm.send(registration("fcm-invalid-token-do-not-log"), CALL)
            await fcm.send(registration(secret), Wake("wake", collapse=""))
        finally:
            await fcm.close()
        text = "\n".join(record.getMessage() + repr(record.__dict__) for record in caplog.records)
        assert fake.issued
        for needle in (secret, "fcm-invalid-token-do-not-log", *fake.issued, "PRIVATE KEY"):
            assert needle not in text
