"""Push wake-ups end to end: devices register through the API, messages and calls
reach the ones with no live connection through local fakes of FCM (OAuth and HTTP
v1), APNs (HTTP/2, ES256 tokens) and Web Push (RFC 8291 payloads, RFC 8292 VAPID),
which check what the real services would and decrypt what they get. Every payload
is asserted whole: a type and, for calls, the call id, nothing else."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid

import pytest
from py_vapid import Vapid
from tornado.httpclient import AsyncHTTPClient

from tests import mongo_server, redis_server
from tests.client import WAIT, Api, Ws
from tests.conftest import TEST_SETTINGS
from tests.fake_apns import FakeAPNs
from tests.fake_fcm import FakeFCM
from tests.fake_webpush import FakeWebPush
from tests.served import KisseProcess

pytestmark = pytest.mark.gen_test(timeout=90)
APNS_TOKEN, VOIP_TOKEN = "a1" * 32, "b2" * 32


@pytest.fixture
def fakes(io_loop, tmp_path):
    fcm, apns, webpush = FakeFCM(), FakeAPNs(tmp_path), FakeWebPush()
    io_loop.run_sync(fcm.start)
    io_loop.run_sync(apns.start)
    io_loop.run_sync(webpush.start)
    yield {"fcm": fcm, "apns": apns, "webpush": webpush, "dir": tmp_path}
    for fake in (fcm, apns, webpush):
        io_loop.run_sync(fake.stop if hasattr(fake, "stop") else fake.close)


@pytest.fixture
def settings(fakes, request):
    apns = {k: v for k, v in dataclasses.asdict(fakes["apns"].settings()).items()
            if k.startswith("push_apns") or k == "push_ca_file"}
    return dataclasses.replace(TEST_SETTINGS, **{**fakes["fcm"].settings(fakes["dir"]), **apns, "push_coalesce": 30.0,
                                                 "push_timeout": 1.0, "call_ring_timeout": 5.0,
                                                 **getattr(request, "param", {})})


async def phone(api, fakes, provider: str, user_name: str | None = None, **login) -> dict:
    """A signed-in device of a user registered with one provider; `device["push"]` is its handle."""
    if user_name is None:
        body = await api.register_full()
    else:
        status, body = await api.login(user_name, **login)
        assert status == 200, body
    token = body["token"]
    if provider == "fcm":
        registration, handle = {"provider": "fcm", "token": f"fcm-{body['device']['device_id']}-{time.time()}"}, None
        handle = registration["token"]
    elif provider == "apns":
        n = body["device"]["device_id"]
        registration = {"provider": "apns", "token": f"{n:02x}" * 32, "voip_token": f"{n + 100:02x}" * 32}
        handle = registration
    else:
        sub = fakes["webpush"].subscribe()
        registration, handle = {"provider": "webpush", **sub}, sub
    status, answer = await api.call("PUT", "/api/push", token, registration)
    assert status == 204, answer
    return {**body, "push": handle, "provider": provider}


async def received(fakes, device: dict, count: int = 1) -> list[dict]:
    """The payloads the device's provider accepted for it (waits for `count`)."""
    if device["provider"] == "fcm":
        bodies = await fakes["fcm"].wait_for(device["push"], count, WAIT)
        return [b["message"]["data"] for b in bodies]
    if device["provider"] == "apns":
        pushes = []
        for token in (device["push"]["token"], device["push"]["voip_token"]):
            pushes += fakes["apns"].received(token)
        deadline = time.monotonic() + WAIT
        while len(pushes) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            pushes = fakes["apns"].received(device["push"]["token"]) + fakes["apns"].received(device["push"]["voip_token"])
        assert len(pushes) >= count, pushes
        return [{k: v for k, v in p.payload.items() if k != "aps"} for p in sorted(pushes, key=lambda p: p.at)]
    pushes = await fakes["webpush"].wait_for(device["push"], count, WAIT)
    return [p.json() for p in pushes]


def sent_so_far(fakes, device: dict) -> int:
    if device["provider"] == "fcm":
        return len(fakes["fcm"].received(device["push"]))
    if device["provider"] == "apns":
        return len(fakes["apns"].received(device["push"]["token"])) + len(fakes["apns"].received(device["push"]["voip_token"]))
    return len(fakes["webpush"].received(device["push"]))


async def test_a_message_wakes_each_sleeping_device_once_and_says_nothing_else(api, ws_url, fakes):
    sender = await api.register_full()
    first = await phone(api, fakes, "webpush")
    user = first["user"]
    api.tokens[user["id"]] = first["token"]
    second = await phone(api, fakes, "fcm", user["username"])
    third = await phone(api, fakes, "apns", user["username"])
    conversation = await api.conversation(sender["token"], user)
    awake = await Ws.connect(ws_url, third["token"])  # this device is online: no push for it
    await awake.ok("sync")
    own = await phone(api, fakes, "webpush", sender["user"]["username"])  # the sender's own other device
    for n in range(5):  # a burst: one wake-up per device
        await api.send(sender["token"], conversation["id"], f"m{n}", "AAEC")
    for device in (first, second):
        assert await received(fakes, device) == [{"type": "wake"}]
    await asyncio.sleep(0.5)
    assert [sent_so_far(fakes, d) for d in (first, second, third, own)] == [1, 1, 0, 0]
    push = fakes["webpush"].received(first["push"])[0]
    assert push.headers["Urgency"] == "normal" and int(push.headers["TTL"]) == 24 * 3600 and push.headers["Topic"]
    message = fakes["fcm"].received(second["push"])[0]["message"]
    assert message["android"] == {"priority": "NORMAL", "ttl": "86400s", "collapse_key": "wake"}
    assert fakes["webpush"].errors == [] and fakes["apns"].errors == []
    awake.close()


async def test_a_call_rings_sleeping_devices_urgently_and_stops_when_it_ends(api, ws_url, fakes, settings):
    caller = await api.register_full()
    ios = await phone(api, fakes, "apns")
    callee = ios["user"]
    api.tokens[callee["id"]] = ios["token"]
    android = await phone(api, fakes, "fcm", callee["username"])
    web = await phone(api, fakes, "webpush", callee["username"])
    await api.conversation(caller["token"], callee)
    ws = await Ws.connect(ws_url, caller["token"])
    call = (await ws.ok("call.start", {"callee_id": callee["id"], "media": "audio"}))["call"]
    for device in (ios, android, web):
        assert await received(fakes, device) == [{"type": "call", "call_id": call["id"]}]
    voip = fakes["apns"].received(ios["push"]["voip_token"])[0]
    assert (voip.push_type, voip.priority, voip.topic) == ("voip", "10", fakes["apns"].topic + ".voip")
    android_call = fakes["fcm"].received(android["push"])[0]["message"]["android"]
    assert android_call["priority"] == "HIGH" and android_call["ttl"] == f"{int(settings.call_ring_timeout)}s"
    assert fakes["webpush"].received(web["push"])[0].headers["Urgency"] == "high"
    await ws.ok("call.cancel", {"call_id": call["id"]})
    for device in (ios, android, web):
        assert (await received(fakes, device, 2))[1] == {"type": "call_end", "call_id": call["id"]}
    assert fakes["apns"].received(ios["push"]["token"])[0].push_type == "background"  # never a VoIP push
    ws.close()


async def test_the_registration_api(api, fakes):
    device = await api.register_full()
    token = device["token"]
    for body, code in (({"provider": "fcm"}, "missing_fields"), ({"provider": "apns", "token": "not hex"}, "invalid_field"),
                       ({"provider": "webpush", "endpoint": "ftp://x", "keys": {"p256dh": "AA", "auth": "AA"}},
                        "invalid_field"),
                       ({"provider": "webpush", "endpoint": "https://push.example/x",
                         "keys": {"p256dh": "AAAA", "auth": "AAAA"}}, "invalid_field"),
                       ({"provider": "carrier-pigeon"}, "invalid_field")):
        status, err = await api.call("PUT", "/api/push", token, body)
        assert status == 400 and err["error"]["code"] == code, (body, err)
    status, vapid = await api.call("GET", "/api/push/vapid")
    assert status == 200 and len(vapid["public_key"]) == 87  # 65 bytes, base64url
    sub = fakes["webpush"].subscribe(application_server_key=vapid["public_key"])  # a stranger's key gets 403
    assert (await api.call("PUT", "/api/push", token, {"provider": "webpush", **sub}))[0] == 204
    features = (await api.call("GET", "/api/capabilities"))[1]["features"]
    assert features["push"] == ["apns", "fcm", "webpush"]
    assert (await api.call("DELETE", "/api/push", token))[0] == 204


async def test_dead_registrations_are_dropped_and_retries_honour_retry_after(api, fakes, storage):
    sender = await api.register_full()
    gone = await phone(api, fakes, "webpush")
    user = gone["user"]
    api.tokens[user["id"]] = gone["token"]
    busy = await phone(api, fakes, "fcm", user["username"])
    conversation = await api.conversation(sender["token"], user)
    fakes["webpush"].unsubscribe(gone["push"])  # 410 from now on
    fakes["fcm"].throttle(busy["push"], times=1, retry_after="1")
    started = time.monotonic()
    await api.send(sender["token"], conversation["id"], "m1", "AAEC")
    assert await received(fakes, busy) == [{"type": "wake"}]
    assert time.monotonic() - started >= 1.0  # it waited as it was told
    deadline = time.monotonic() + WAIT
    while len(await storage.push_registrations([user["id"]])) != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [r["push"]["provider"] for r in await storage.push_registrations([user["id"]])] == ["fcm"]


async def test_a_hanging_provider_never_slows_a_send(api, fakes):
    sender = await api.register_full()
    device = await phone(api, fakes, "webpush")
    conversation = await api.conversation(sender["token"], device["user"])
    fakes["webpush"].hang(device["push"], 10.0)
    timings = []
    for n in range(20):
        started = time.monotonic()
        await api.send(sender["token"], conversation["id"], f"m{n}", "AAEC")
        timings.append(time.monotonic() - started)
    # The provider holds each request for 10 s and the push timeout is 1 s: a send
    # that waited for it would take a second at least.
    assert max(timings) < 0.8, timings


async def test_a_signed_out_device_is_pushed_no_more(api, fakes, storage):
    sender = await api.register_full()
    device = await phone(api, fakes, "webpush")
    conversation = await api.conversation(sender["token"], device["user"])
    assert (await api.call("POST", "/api/auth/logout", device["token"]))[0] == 204
    assert await storage.push_registrations([device["user"]["id"]]) == []
    await api.send(sender["token"], conversation["id"], "m1", "AAEC")
    await asyncio.sleep(0.5)
    assert sent_so_far(fakes, device) == 0


# -- a cluster pushes once, and never to a device connected to another node ---------------
async def test_two_nodes_push_once_and_not_to_a_device_connected_elsewhere(tmp_path):
    for reason in (redis_server.unavailable_reason(), mongo_server.unavailable_reason()):
        if reason:
            pytest.fail(reason) if os.environ.get("CI") == "true" else pytest.skip(reason)
    vapid = Vapid()
    vapid.generate_keys()
    vapid.save_key(str(tmp_path / "vapid.pem"))  # one key for the cluster: a subscription is bound to it
    redis = redis_server.RedisServer().start()
    env = {"KISSE_STORAGE": mongo_server.shared_server().uri(f"kisse_push_{uuid.uuid4().hex[:8]}"),
           "KISSE_BUS": redis.url, "KISSE_JWT_SECRET": "push-cluster-secret-long-enough-for-hs256!",
           "KISSE_BUS_LEASE": "1.5", "KISSE_PUSH_VAPID_PRIVATE_KEY": str(tmp_path / "vapid.pem")}
    nodes = []
    async with FakeWebPush() as webpush:
        try:
            for i in range(2):
                nodes.append(KisseProcess(env, stderr=open(tmp_path / f"node{i}.log", "w")).start())  # noqa: SIM115
            one, two = (Api(AsyncHTTPClient(), node.base) for node in nodes)
            sender = await one.register_full()
            first = await one.register_full()
            user = first["user"]
            one.tokens[user["id"]] = first["token"]
            status, second = await one.login(user["username"])
            conversation = await one.conversation(sender["token"], user)
            await one.send(sender["token"], conversation["id"], "m0", "AAEC")  # node 1 learns: no registrations
            await asyncio.sleep(0.3)
            subs = []
            for device in (first, second):  # registered through node 2: node 1 must forget what it knew
                subs.append(webpush.subscribe())
                assert (await two.call("PUT", "/api/push", device["token"], {"provider": "webpush", **subs[-1]}))[0] == 204
            # The second device is connected, to the other node.
            awake = await Ws.connect(nodes[1].base.replace("http://", "ws://") + "/ws", second["token"])
            await awake.ok("sync")
            await asyncio.sleep(2.0)  # a heartbeat: node 1 counts node 2's lease
            await one.send(sender["token"], conversation["id"], "m1", "AAEC")
            assert [p.json() for p in await webpush.wait_for(subs[0], 1, WAIT)] == [{"type": "wake"}]
            await asyncio.sleep(1.0)
            assert len(webpush.received(subs[0])) == 1 and webpush.received(subs[1]) == []  # once; none for the awake
            seen = [(await awake.event("message.new"))["data"]["client_message_id"] for _ in range(2)]
            assert seen == ["m0", "m1"]  # it got them live (m0 by its catch-up), not by push
            awake.close()
        finally:
            for node in nodes:
                node.stop()
            redis.stop()


def _vapid_key_file() -> str:
    """A VAPID key for a production-mode server (where none is generated)."""
    import tempfile
    key = Vapid()
    key.generate_keys()
    path = os.path.join(tempfile.mkdtemp(prefix="kisse-vapid-"), "vapid.pem")
    key.save_key(path)
    return path


@pytest.mark.parametrize("settings", [{"env": "production", "bcrypt_rounds": 10,
                                       "push_vapid_private_key": _vapid_key_file()}], indirect=True, ids=["production"])
async def test_in_production_an_endpoint_must_be_a_public_https_url(api, fakes):
    token = (await api.register_full())["token"]
    keys = fakes["webpush"].subscribe()["keys"]
    for endpoint in ("http://push.example.org/x", "https://127.0.0.1/x", "https://10.1.2.3/x", "https://[::1]/x",
                     "https://169.254.169.254/latest", "https://localhost/x"):
        status, err = await api.call("PUT", "/api/push", token, {"provider": "webpush", "endpoint": endpoint,
                                                                 "keys": keys})
        assert status == 400 and err["error"]["details"]["field"] == "endpoint", endpoint
    assert (await api.call("PUT", "/api/push", token, {"provider": "webpush", "endpoint": "https://push.example.org/x",
                                                       "keys": keys}))[0] == 204


@pytest.mark.parametrize("settings", [{"push_coalesce": 1.0}], indirect=True, ids=["coalesce=1s"])
async def test_a_message_within_the_window_wakes_the_device_at_its_end(api, fakes):
    sender = await api.register_full()
    device = await phone(api, fakes, "webpush")
    conversation = await api.conversation(sender["token"], device["user"])
    await api.send(sender["token"], conversation["id"], "m1", "AAEC")
    first = (await fakes["webpush"].wait_for(device["push"], 1, WAIT))[0]
    for n in range(2, 6):  # the app may have gone back to sleep: these must not wait for the next message
        await api.send(sender["token"], conversation["id"], f"m{n}", "AAEC")
    await asyncio.sleep(0.3)
    assert len(fakes["webpush"].received(device["push"])) == 1  # not at once
    second = (await fakes["webpush"].wait_for(device["push"], 2, WAIT))[1]
    assert 0.8 <= second.at - first.at <= 1.0 + WAIT and second.json() == {"type": "wake"}
    await asyncio.sleep(1.3)
    assert len(fakes["webpush"].received(device["push"])) == 2  # one for the whole burst
