"""Abuse limits, tried as an attacker would: each limit is hit, answers an honest
429 (or a WebSocket `rate_limited`), keeps nothing of what it refused, and lets
the client in again once its window has passed. Windows are a few seconds here."""
from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClosedError

from tests import redis_server
from tests.client import WAIT, Api, Ws
from tests.conftest import with_settings
from tests.prekeys import DeviceKeys
from tests.served import KisseProcess

pytestmark = pytest.mark.gen_test(timeout=60)
PASSWORD = "password123"


def on(**limits) -> object:
    return with_settings(rate_limits="on", trusted_proxies=("127.0.0.1/32",), **limits)


def limited(answer: tuple[int, dict], window: float) -> int:
    """The retry_after of a 429 `rate_limited`, checked to be within the window."""
    status, body = answer
    assert status == 429 and body["error"]["code"] == "rate_limited", answer
    retry_after = body["error"]["details"]["retry_after"]
    assert isinstance(retry_after, int) and 1 <= retry_after <= window + 1, body
    return retry_after


async def from_ip(api: Api, ip: str, method: str, path: str, body=None, token=None, **kwargs):
    return await api.call(method, path, token, body, headers={"X-Forwarded-For": ip}, **kwargs)


@pytest.mark.parametrize("settings", [on(limit_login_ip="3/2 seconds")], ids=["ip=3"])
async def test_login_failures_per_address_then_the_window_passes(api):
    await api.register_full("victim")
    for _ in range(3):
        assert (await from_ip(api, "198.51.100.7", "POST", "/api/auth/login",
                              {"username": "victim", "password": "wrong-password"}))[0] == 401
    # Spent: even the right password is refused, before any bcrypt, with an honest Retry-After.
    refused = await api.http.fetch(HTTPRequest(api.base_url + "/api/auth/login", method="POST",
                                               headers={"X-Forwarded-For": "198.51.100.7"},
                                               body=f'{{"username": "victim", "password": "{PASSWORD}"}}'),
                                   raise_error=False)
    assert refused.code == 429
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    # Another address is another budget; behind the trusted proxy each client has its own.
    assert (await from_ip(api, "203.0.113.9", "POST", "/api/auth/login",
                          {"username": "victim", "password": PASSWORD}))[0] == 200
    await asyncio.sleep(retry_after + 0.1)
    assert (await from_ip(api, "198.51.100.7", "POST", "/api/auth/login",
                          {"username": "victim", "password": PASSWORD}))[0] == 200


@pytest.mark.parametrize("settings", [with_settings(rate_limits="on", limit_login_ip="3/minute")], ids=["no-proxy"])
async def test_x_forwarded_for_is_not_believed_from_an_untrusted_peer(api):
    await api.register_full("victim")
    for n in range(3):  # a client writing a new X-Forwarded-For each time is still one address
        assert (await from_ip(api, f"198.51.100.{n}", "POST", "/api/auth/login",
                              {"username": "victim", "password": "wrong-password"}))[0] == 401
    limited(await from_ip(api, "198.51.100.99", "POST", "/api/auth/login",
                          {"username": "victim", "password": PASSWORD}), 60)


@pytest.mark.parametrize("settings", [on(limit_login_user="3/minute", limit_login_ip="100/minute")], ids=["user=3"])
async def test_a_locked_account_refuses_even_the_right_password_and_its_devices_keep_working(api):
    victim = await api.register_full("victim")
    await api.register_full("bystander")
    for n in range(3):  # a guesser spreading over three addresses
        assert (await from_ip(api, f"198.51.100.{n}", "POST", "/api/auth/login",
                              {"username": "VICTIM", "password": "wrong-password"}))[0] == 401
    limited(await from_ip(api, "203.0.113.1", "POST", "/api/auth/login",
                          {"username": "victim", "password": PASSWORD}), 60)
    assert (await api.login("bystander"))[0] == 200  # another account is not affected
    # The victim's signed-in devices never needed the password: they go on.
    assert (await api.call("GET", "/api/auth/me", victim["token"]))[0] == 200
    status, renewed = await api.call("POST", "/api/auth/refresh", body={"refresh_token": victim["refresh_token"]})
    assert status == 200 and renewed["token"]


@pytest.mark.parametrize("settings", [on(limit_register_ip="2/2 seconds")], ids=["register=2"])
async def test_sign_ups_per_address_keep_nothing_they_refuse(api):
    name = f"u{uuid.uuid4().hex[:8]}"
    for n in range(2):
        assert (await from_ip(api, "198.51.100.1", "POST", "/api/auth/register",
                              {"username": f"{name}{n}", "password": PASSWORD}))[0] == 201
    retry_after = limited(await from_ip(api, "198.51.100.1", "POST", "/api/auth/register",
                                        {"username": f"{name}x", "password": PASSWORD}), 2)
    assert (await api.login(f"{name}x"))[0] == 401  # not created
    await asyncio.sleep(retry_after + 0.1)
    assert (await from_ip(api, "198.51.100.1", "POST", "/api/auth/register",
                          {"username": f"{name}x", "password": PASSWORD}))[0] == 201


@pytest.mark.parametrize("settings", [on(limit_send="3/2 seconds;100/hour")], ids=["send=3"])
async def test_sends_count_rest_and_websocket_together(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    ws = await Ws.connect(ws_url, ta)
    try:
        await api.send(ta, conversation["id"], "m1", "AAEC")
        await ws.ok("message.send", {"conversation_id": conversation["id"], "client_message_id": "m2"})
        await api.send(ta, conversation["id"], "m3", "AAEC")
        refused = await ws.request("message.send", {"conversation_id": conversation["id"], "client_message_id": "m4"})
        assert refused["type"] == "error" and refused["id"] and refused["data"]["code"] == "rate_limited"
        retry_after = refused["data"]["details"]["retry_after"]
        assert 1 <= retry_after <= 2
        limited(await api.call("POST", "/api/messages", ta, {"conversation_id": conversation["id"],
                                                              "client_message_id": "m5"}), 2)
        status, history = await api.call("GET", f"/api/conversations/{conversation['id']}/messages", tb)
        assert [m["client_message_id"] for m in history["messages"]] == ["m1", "m2", "m3"]  # nothing refused kept
        assert (await api.call("POST", "/api/messages", tb, {"conversation_id": conversation["id"],
                                                             "client_message_id": "b1"}))[0] == 201  # bob's own
        await asyncio.sleep(retry_after + 0.1)
        await ws.ok("message.send", {"conversation_id": conversation["id"], "client_message_id": "m4"})
    finally:
        ws.close()


@pytest.mark.parametrize("settings", [on(limit_send="60/10 seconds;70/hour")], ids=["send=60"])
async def test_a_limit_counted_in_leases_is_still_exact(api):
    """60 a window is counted three units at a time in this process: still exactly 60."""
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    statuses = [(await api.call("POST", "/api/messages", ta, {"conversation_id": conversation["id"],
                                                              "client_message_id": f"m{n}"}))[0] for n in range(62)]
    assert statuses == [201] * 60 + [429] * 2
    assert len((await api.call("GET", f"/api/conversations/{conversation['id']}/messages?limit=100", tb))[1]
               ["messages"]) == 60


@pytest.mark.parametrize("settings", [on(limit_refresh="2/minute", limit_password="1/minute")], ids=["refresh=2"])
async def test_refreshes_per_device_and_password_changes_per_user(api):
    first = await api.register_full()
    token = first["refresh_token"]
    for _ in range(2):
        status, body = await api.call("POST", "/api/auth/refresh", body={"refresh_token": token})
        assert status == 200
        token = body["refresh_token"]
    limited(await api.call("POST", "/api/auth/refresh", body={"refresh_token": token}), 60)
    # Refused before anything was spent: the device is not signed out, its token is still its own.
    assert (await api.call("GET", "/api/devices", body["token"]))[0] == 200
    status, other = await api.login(first["user"]["username"])
    assert (await api.call("POST", "/api/auth/refresh", body={"refresh_token": other["refresh_token"]}))[0] == 200
    change = {"current_password": PASSWORD, "new_password": "another-password"}
    assert (await api.call("POST", "/api/auth/password", body["token"], change))[0] == 200
    limited(await api.call("POST", "/api/auth/password", body["token"],
                           {"current_password": "another-password", "new_password": PASSWORD}), 60)


@pytest.mark.parametrize("settings", [on(limit_upload_bytes="1000/minute")], ids=["upload=1000"])
async def test_upload_bytes_per_user_are_refused_before_the_body(api):
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    first = await api.send(ta, conversation["id"], "file-1")
    second = await api.send(ta, conversation["id"], "file-2")
    headers = {"Content-Type": "application/octet-stream"}
    assert (await api.call("POST", f"/api/messages/{first['id']}/content", ta, raw=b"x" * 600, headers=headers))[0] == 201
    limited(await api.call("POST", f"/api/messages/{second['id']}/content", ta, raw=b"y" * 600, headers=headers), 60)
    assert (await api.call("GET", f"/api/messages/{second['id']}/content", tb))[0] == 404  # nothing kept


@pytest.mark.parametrize("settings", [on(limit_claims="3/minute", limit_claims_pair="2/minute", limit_calls="1/minute",
                                         limit_search="2/minute")], ids=["claims"])
async def test_key_claims_calls_and_searches(api, ws_url):
    ta, alice = await api.register()
    others = [await api.register() for _ in range(2)]
    for token, user in others:
        await api.conversation(ta, user)
        await api.call("PUT", "/api/keys", token, DeviceKeys().upload())
    first, second = (user for _, user in others)
    for _ in range(2):
        assert (await api.call("GET", f"/api/keys/{first['id']}", ta))[0] == 200
    limited(await api.call("GET", f"/api/keys/{first['id']}", ta), 60)  # this pair is spent
    assert (await api.call("GET", f"/api/keys/{second['id']}", ta))[0] == 200  # the claimer's 3rd
    limited(await api.call("GET", f"/api/keys/{second['id']}", ta), 60)  # the claimer's budget is spent
    assert (await api.call("GET", "/api/keys", others[1][0]))[1]["one_time_prekeys"] == 4  # refused: none taken
    ws = await Ws.connect(ws_url, ta)
    try:
        call = await ws.ok("call.start", {"callee_id": first["id"], "media": "audio"})
        await ws.ok("call.hangup", {"call_id": call["call"]["id"]})
        refused = await ws.request("call.start", {"callee_id": first["id"], "media": "audio"})
        assert refused["data"]["code"] == "rate_limited"
    finally:
        ws.close()
    for _ in range(2):
        assert (await api.call("GET", "/api/users?q=us", ta))[0] == 200
    limited(await api.call("GET", "/api/users?q=us", ta), 60)


async def handshake(ws_url: str, token: str, ip: str = "198.51.100.1") -> Ws | int:
    """A connection, or the HTTP status its handshake was refused with."""
    try:
        return await Ws.connect_request(HTTPRequest(f"{ws_url}?token={token}", headers={"X-Forwarded-For": ip}))
    except HTTPClientError as error:
        return error.code


@pytest.mark.parametrize("settings", [on(limit_ws_user="3/minute", limit_ws_ip="100/minute")], ids=["opens=3"])
async def test_websocket_opens_per_user(api, ws_url):
    token, _ = await api.register()
    sockets = [await handshake(ws_url, token) for _ in range(4)]
    assert [isinstance(s, Ws) for s in sockets] == [True, True, True, False] and sockets[3] == 429
    for ws in sockets[:3]:
        ws.close()


@pytest.mark.parametrize("settings", [on(max_ws_per_user=2, max_ws_per_ip=3)], ids=["open=2"])
async def test_open_websockets_per_user_and_per_address(api, ws_url):
    ta, _ = await api.register()
    tb, _ = await api.register()
    a1, a2 = await handshake(ws_url, ta), await handshake(ws_url, ta)
    assert await handshake(ws_url, ta) == 429
    a1.close()
    deadline = time.monotonic() + WAIT
    while isinstance(again := await handshake(ws_url, ta), int) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the server notices the close a moment later
    assert isinstance(again, Ws)
    b1 = await handshake(ws_url, tb)  # the address's third
    assert await handshake(ws_url, tb) == 429
    assert isinstance(b2 := await handshake(ws_url, tb, ip="203.0.113.5"), Ws)  # another client
    for ws in (a2, again, b1, b2):
        ws.close()


@pytest.mark.parametrize("settings", [on(ws_frame_rate=5)], ids=["frames=5"])
async def test_a_flooding_connection_is_told_then_closed(api, ws_url):
    token, _ = await api.register()
    ws = await Ws.connect(ws_url, token)
    replies = await asyncio.gather(*(ws.request("ping") for _ in range(8)))
    assert [r["type"] for r in replies] == ["pong"] * 5 + ["error"] * 3
    assert replies[5]["data"]["code"] == "rate_limited" and replies[5]["data"]["details"]["retry_after"] == 1
    for _ in range(10):  # it keeps going
        try:
            ws.conn.write_message('{"type": "ping"}')
        except WebSocketClosedError:
            break
    assert await asyncio.wait_for(ws.closed, WAIT) == 1008
    again = await Ws.connect(ws_url, token)  # a polite client that waits gets on
    await asyncio.sleep(1.05)
    assert [(await again.request("ping"))["type"] for _ in range(5)] == ["pong"] * 5
    again.close()


@pytest.mark.parametrize("settings", [with_settings(rate_limits="off", limit_login_ip="1/minute",
                                                    limit_send="1/minute", ws_frame_rate=1)], ids=["off"])
async def test_the_switch_lifts_every_limit(api, ws_url):
    await api.register_full("tester")
    for _ in range(5):
        assert (await api.call("POST", "/api/auth/login", body={"username": "tester", "password": "nope-nope"}))[0] == 401
    ta, alice = await api.register()
    tb, bob = await api.register()
    conversation = await api.conversation(ta, bob)
    ws = await Ws.connect(ws_url, ta)
    for n in range(5):
        await ws.ok("message.send", {"conversation_id": conversation["id"], "client_message_id": f"m{n}"})
    ws.close()


# -- one budget for the whole cluster ------------------------------------------------------
@pytest.fixture
def two_nodes(tmp_path):
    reason = redis_server.unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    redis = redis_server.RedisServer().start()
    env = {"KISSE_BUS": redis.url, "KISSE_RATE_LIMITS": "on", "KISSE_LIMIT_LOGIN_USER": "4/minute",
           "KISSE_LIMIT_REGISTER_IP": "100/minute",
           "KISSE_JWT_SECRET": "limits-test-secret-long-enough-for-hs256!"}
    nodes = []
    try:
        for i in range(2):
            nodes.append(KisseProcess(env, stderr=open(tmp_path / f"node{i}.log", "w")).start())  # noqa: SIM115
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        redis.stop()


async def test_two_nodes_share_one_budget(two_nodes):
    apis = [Api(AsyncHTTPClient(), node.base) for node in two_nodes]
    # Sign-ups per address, 100 a minute, counted five at a time by each node through Redis:
    # a client hopping between nodes never gets past 100; units one node leased and did not
    # use may make the refusal come up to 4 early.
    statuses = [(await apis[n % 2].call("POST", "/api/auth/register",
                                        body={"username": f"hop{n}{uuid.uuid4().hex[:6]}", "password": PASSWORD}))[0]
                for n in range(110)]
    allowed = statuses.count(201)
    assert 96 <= allowed <= 100 and statuses[allowed:] == [429] * (110 - allowed), statuses
    # Failed logins for one account, hopping between nodes: no extra tries.
    statuses = [(await apis[n % 2].call("POST", "/api/auth/login",
                                        body={"username": "someone", "password": "wrong-password"}))[0]
                for n in range(6)]
    assert statuses == [401, 401, 401, 401, 429, 429]


@pytest.mark.parametrize("settings", [on()], ids=["defaults"])
async def test_with_the_defaults_one_address_cannot_lock_an_account(api):
    await api.register_full("victim")
    statuses = [(await from_ip(api, "198.51.100.7", "POST", "/api/auth/login",
                               {"username": "victim", "password": "wrong-password"}))[0] for _ in range(12)]
    assert statuses == [401] * 5 + [429] * 7  # the address is spent long before the account
    assert (await from_ip(api, "203.0.113.9", "POST", "/api/auth/login",
                          {"username": "victim", "password": PASSWORD}))[0] == 200
