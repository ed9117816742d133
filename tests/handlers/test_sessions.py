"""Devices and sessions through HTTP and the WebSocket: stay logged in for months,
cut off a lost phone in a second."""
from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from tests.client import WAIT, Ws
from tests.conftest import with_settings

pytestmark = pytest.mark.gen_test


async def test_every_login_is_a_device_with_tokens(api):
    body = await api.register_full("dora", device_name="Dora's Pixel")
    assert body["token_type"] == "Bearer" and body["token"] and body["refresh_token"]
    assert body["expires_at"].endswith("Z") and body["refresh_expires_at"] > body["expires_at"]
    assert body["device"]["device_id"] == 1 and body["device"]["name"] == "Dora's Pixel"
    status, second = await api.login("dora")  # no device_name: a default one
    assert status == 200 and second["device"]["device_id"] == 2 and second["device"]["name"]
    status, listed = await api.call("GET", "/api/devices", second["token"])
    assert status == 200
    assert [(d["device_id"], d["current"]) for d in listed["devices"]] == [(1, False), (2, True)]
    assert set(listed["devices"][0]) == {"device_id", "name", "created_at", "last_seen_at", "current"}


@pytest.mark.parametrize("settings", [with_settings(max_devices=3)], ids=["max=3"])
async def test_the_device_cap_says_which_devices_to_remove(api):
    first = await api.register_full("erin")
    for _ in range(2):
        assert (await api.login("erin"))[0] == 200
    status, body = await api.login("erin", device_name="one too many")
    assert status == 409 and body["error"]["code"] == "too_many_devices"
    assert [d["device_id"] for d in body["error"]["details"]["devices"]] == [1, 2, 3]
    # The password proves the owner: at the cap they may sign one device out in the new one's place.
    status, body = await api.login("erin", device_name="new phone", replace_device_id=9)
    assert status == 409 and body["error"]["code"] == "too_many_devices"  # not one of theirs
    status, body = await api.login("erin", device_name="new phone", replace_device_id=3)
    assert status == 200 and body["device"]["device_id"] == 3 and body["device"]["name"] == "new phone"
    assert await api.call("DELETE", "/api/devices/2", first["token"]) == (204, b"")
    status, body = await api.login("erin", device_name="replacement")
    assert status == 200 and body["device"]["device_id"] == 2  # the lowest free id again
    for missing in ("9", "0", "abc", "1" * 50):  # not yours, never was, or not a number: alike
        status, body = await api.call("DELETE", f"/api/devices/{missing}", first["token"])
        assert status == 404 and body["error"]["code"] == "device_not_found", missing
    other = await api.register_full()
    assert (await api.call("DELETE", "/api/devices/1", other["token"]))[0] == 204  # their own device 1
    status, _ = await api.call("GET", "/api/devices", first["token"])
    assert status == 200  # erin's device 1 was not touched


@pytest.mark.parametrize("settings", [with_settings(refresh_race_grace=0)], ids=["no-grace"])
async def test_refresh_rotates_and_a_reused_token_signs_the_device_out(api, ws_url):
    first = await api.register_full("fay")
    other = (await api.login("fay"))[1]
    socket = await Ws.connect(ws_url, first["token"])
    bystander = await Ws.connect(ws_url, other["token"])
    status, renewed = await api.call("POST", "/api/auth/refresh", body={"refresh_token": first["refresh_token"]})
    assert status == 200 and renewed["refresh_token"] != first["refresh_token"]
    assert renewed["device"]["device_id"] == 1 and renewed["user"]["id"] == first["user"]["id"]
    assert (await api.call("GET", "/api/auth/me", renewed["token"]))[0] == 200
    # The spent token again: it was copied. The whole device session goes.
    started = time.monotonic()
    status, body = await api.call("POST", "/api/auth/refresh", body={"refresh_token": first["refresh_token"]})
    assert status == 401 and body["error"]["code"] == "refresh_token_reused"
    assert await asyncio.wait_for(socket.closed, WAIT) == 4003
    print(f"revoked device's WebSocket closed with 4003 after {time.monotonic() - started:.3f} s")
    assert time.monotonic() - started < 1.0
    for token in (renewed["token"], first["token"]):
        status, body = await api.call("GET", "/api/auth/me", token)
        assert status == 401 and body["error"]["code"] == "session_revoked"
    status, body = await api.call("POST", "/api/auth/refresh", body={"refresh_token": renewed["refresh_token"]})
    assert status == 401 and body["error"]["code"] == "invalid_refresh_token"
    assert (await bystander.request("ping"))["type"] == "pong"  # the other device stays
    assert (await api.call("GET", "/api/auth/me", other["token"]))[0] == 200
    for garbage in ("garbage", "x" * 200):
        status, body = await api.call("POST", "/api/auth/refresh", body={"refresh_token": garbage})
        assert status == 401 and body["error"]["code"] == "invalid_refresh_token"
    bystander.close()


async def test_two_refreshes_racing_with_one_token_have_one_winner(api):
    first = await api.register_full()
    results = await asyncio.gather(*(api.call("POST", "/api/auth/refresh",
                                              body={"refresh_token": first["refresh_token"]}) for _ in range(5)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 409, 409, 409, 409], results
    assert all(body["error"]["code"] == "refresh_race" for status, body in results if status == 409)
    winner = next(body for status, body in results if status == 200)
    assert (await api.call("GET", "/api/auth/me", winner["token"]))[0] == 200  # the race revoked nothing
    assert (await api.call("POST", "/api/auth/refresh", body={"refresh_token": winner["refresh_token"]}))[0] == 200


@pytest.mark.parametrize("settings", [with_settings(refresh_ttl=1)], ids=["refresh=1s"])
async def test_an_expired_refresh_token_is_told_apart(api):
    first = await api.register_full()
    await asyncio.sleep(1.2)
    status, body = await api.call("POST", "/api/auth/refresh", body={"refresh_token": first["refresh_token"]})
    assert status == 401 and body["error"]["code"] == "refresh_token_expired"


@pytest.mark.parametrize("settings", [with_settings(access_ttl=1)], ids=["access=1s"])
async def test_an_expired_access_token_is_refreshed_and_the_websocket_stays(api, ws_url, settings):
    first = await api.register_full()
    socket = await Ws.connect(ws_url, first["token"])
    await asyncio.sleep(settings.access_ttl + 1.1)
    status, body = await api.call("GET", "/api/auth/me", first["token"])
    assert status == 401 and body["error"]["code"] == "token_expired"
    # The socket belongs to the session, not to the token it opened with.
    assert not socket.closed.done() and (await socket.request("ping"))["type"] == "pong"
    status, renewed = await api.call("POST", "/api/auth/refresh", body={"refresh_token": first["refresh_token"]})
    # A fresh access token (not checked with a request: on a slow machine it may
    # already have lived its one second).
    claims = jwt.decode(renewed["token"], options={"verify_signature": False})
    assert status == 200 and claims["sub"] == first["user"]["id"] and claims["exp"] - claims["iat"] == 1
    assert claims["jti"] != jwt.decode(first["token"], options={"verify_signature": False})["jti"]
    socket.close()


async def test_logout_signs_out_this_device_only(api, ws_url):
    first = await api.register_full("gus")
    other = (await api.login("gus"))[1]
    mine, theirs = await Ws.connect(ws_url, first["token"]), await Ws.connect(ws_url, other["token"])
    assert await api.call("POST", "/api/auth/logout", first["token"]) == (204, b"")
    assert await asyncio.wait_for(mine.closed, WAIT) == 4003
    assert (await api.call("GET", "/api/auth/me", first["token"]))[1]["error"]["code"] == "session_revoked"
    status, body = await api.call("POST", "/api/auth/refresh", body={"refresh_token": first["refresh_token"]})
    assert status == 401 and body["error"]["code"] == "invalid_refresh_token"
    assert (await theirs.request("ping"))["type"] == "pong"
    status, listed = await api.call("GET", "/api/devices", other["token"])
    assert [d["device_id"] for d in listed["devices"]] == [2]
    # A revoked token is refused at the handshake too.
    with pytest.raises(Exception) as refused:
        await Ws.connect(ws_url, first["token"])
    assert getattr(refused.value, "code", None) == 401
    theirs.close()


async def test_a_password_change_signs_out_every_other_device(api, ws_url):
    first = await api.register_full("hal", "old-password-1")
    other = (await api.login("hal", "old-password-1"))[1]
    theirs = await Ws.connect(ws_url, other["token"])
    status, body = await api.call("POST", "/api/auth/password", first["token"],
                                  {"current_password": "wrong-password", "new_password": "new-password-2"})
    assert status == 401 and body["error"]["code"] == "invalid_credentials"
    status, body = await api.call("POST", "/api/auth/password", first["token"],
                                  {"current_password": "old-password-1", "new_password": "short"})
    assert status == 400 and body["error"]["code"] == "weak_password"
    status, fresh = await api.call("POST", "/api/auth/password", first["token"],
                                   {"current_password": "old-password-1", "new_password": "new-password-2"})
    assert status == 200 and fresh["device"]["device_id"] == 1
    assert await asyncio.wait_for(theirs.closed, WAIT) == 4003
    assert (await api.call("GET", "/api/auth/me", other["token"]))[1]["error"]["code"] == "session_revoked"
    assert (await api.call("GET", "/api/auth/me", fresh["token"]))[0] == 200
    assert (await api.call("GET", "/api/auth/me", first["token"]))[0] == 200  # this device's old access token too
    status, body = await api.call("POST", "/api/auth/refresh", body={"refresh_token": first["refresh_token"]})
    assert status == 401  # replaced by the fresh one
    assert (await api.call("POST", "/api/auth/refresh", body={"refresh_token": fresh["refresh_token"]}))[0] == 200
    assert (await api.login("hal", "old-password-1"))[0] == 401
    assert (await api.login("hal", "new-password-2"))[0] == 200


async def test_deleting_an_account(api, ws_url):
    alice = await api.register_full("ivy")
    bob = await api.register_full("jon")
    conversation = await api.conversation(alice["token"], bob["user"])
    message = await api.send(alice["token"], conversation["id"], "m1", "c2VjcmV0")
    uploaded = await api.send(alice["token"], conversation["id"], "m2")
    assert (await api.call("POST", f"/api/messages/{uploaded['id']}/content", alice["token"], raw=b"blob"))[0] == 201
    await api.send(bob["token"], conversation["id"], "m3", "aGk=")
    watcher, gone = await Ws.connect(ws_url, bob["token"]), await Ws.connect(ws_url, alice["token"])
    status, body = await api.call("DELETE", "/api/auth/me", alice["token"], {"password": "not-it-at-all"})
    assert status == 401
    assert await api.call("DELETE", "/api/auth/me", alice["token"], {"password": "password123"}) == (204, b"")
    assert await asyncio.wait_for(gone.closed, WAIT) == 4003
    event = await watcher.event("user.deleted")
    assert event["data"] == {"user_id": alice["user"]["id"]}
    assert (await api.login("ivy"))[0] == 401
    status, body = await api.call("POST", "/api/auth/register", body={"username": "ivy", "password": "password123"})
    assert status == 409 and body["error"]["code"] == "username_taken"  # reserved (docs/SECURITY.md)
    status, view = await api.call("GET", f"/api/conversations/{conversation['id']}", bob["token"])
    former = next(p for p in view["conversation"]["participants"] if p["id"] == alice["user"]["id"])
    assert former["deleted"] is True and former["presence"]["status"] == "offline"
    _, history = await api.call("GET", f"/api/conversations/{conversation['id']}/messages", bob["token"])
    assert [(m["seq"], m["tombstone"]) for m in history["messages"]] == \
        [(1, "sender_deleted"), (2, "sender_deleted"), (3, None)]
    assert history["messages"][0]["ciphertext"] is None and history["messages"][0]["id"] == message["id"]
    status, body = await api.call("GET", f"/api/messages/{uploaded['id']}/content", bob["token"])
    assert status == 404
    status, found = await api.call("GET", "/api/users?q=iv", bob["token"])
    assert found["users"] == []
    watcher.close()
