"""The key directory through HTTP and the WebSocket: uploads checked as libsignal
makes them, claims that hand each one-time key out once, and only to people who
may write to the owner. (Signal's own library proves the whole: tests/test_signal.py.)"""
from __future__ import annotations

import asyncio

import pytest

from tests.client import Ws
from tests.conftest import with_settings
from tests.prekeys import DeviceKeys, b64, kyber_key

pytestmark = pytest.mark.gen_test


async def upload(api, token, keys: DeviceKeys, **kwargs) -> dict:
    status, body = await api.call("PUT", "/api/keys", token, keys.upload(**kwargs))
    assert status == 200, body
    return body


async def claim(api, token, user_id, device_id=None) -> tuple[int, dict]:
    return await api.call("GET", f"/api/keys/{user_id}" + (f"/{device_id}" if device_id else ""), token)


async def test_a_contact_claims_a_bundle_and_each_one_time_key_once(api):
    ta, alice = await api.register()
    tb, bob = await api.register()
    await api.conversation(ta, bob)
    keys = DeviceKeys(registration_id=4321)
    body = keys.upload(one_time=[1, 2], pq=[11, 12])
    status, counts = await api.call("PUT", "/api/keys", tb, body)
    assert status == 200 and counts == {"one_time_prekeys": 2, "pq_one_time_prekeys": 2}
    assert await api.call("GET", "/api/keys", tb) == (200, counts)
    seen = []
    for _ in range(3):
        status, got = await claim(api, ta, bob["id"])
        assert status == 200 and got["user_id"] == bob["id"]
        device, = got["devices"]
        assert device["device_id"] == 1 and device["registration_id"] == 4321
        assert device["identity_key"] == b64(keys.identity_key) and device["signed_prekey"] == body["signed_prekey"]
        seen.append((device["one_time_prekey"], device["pq_prekey"]))
    assert seen[0] == (body["one_time_prekeys"][0], body["pq_one_time_prekeys"][0])
    assert seen[1] == (body["one_time_prekeys"][1], body["pq_one_time_prekeys"][1])
    assert seen[2] == (None, body["pq_last_resort_prekey"])  # pools empty: the last-resort key, again and again
    assert await api.call("GET", "/api/keys", tb) == (200, {"one_time_prekeys": 0, "pq_one_time_prekeys": 0})
    status, one = await claim(api, ta, bob["id"], 1)
    assert status == 200 and [d["device_id"] for d in one["devices"]] == [1]
    for missing in ("2", "0", "128", "abc", "0001", "99999999999"):
        status, err = await claim(api, ta, bob["id"], missing)
        assert status == 404 and err["error"]["code"] == "device_not_found", missing


async def test_concurrent_claims_never_hand_a_key_out_twice(api):
    ta, alice = await api.register()
    tb, bob = await api.register()
    await api.conversation(ta, bob)
    await upload(api, tb, DeviceKeys(), one_time=range(1, 11), pq=range(1, 6))
    results = await asyncio.gather(*(claim(api, ta, bob["id"]) for _ in range(24)))
    devices = [body["devices"][0] for status, body in results if status == 200]
    assert len(devices) == 24
    ec = [d["one_time_prekey"]["key_id"] for d in devices if d["one_time_prekey"]]
    pq = [d["pq_prekey"]["key_id"] for d in devices]
    assert sorted(ec) == list(range(1, 11))
    assert sorted(k for k in pq if k != 1000) == list(range(1, 6)) and pq.count(1000) == 19


async def test_signatures_are_checked_against_the_identity_key(api):
    token, _ = await api.register()
    keys, impostor = DeviceKeys(), DeviceKeys()
    cases = {
        "signed_prekey": lambda b: b["signed_prekey"].update(signature=b64(impostor.sign(b"x"))),
        "pq_last_resort_prekey": lambda b: b.update(pq_last_resort_prekey=impostor.signed(1000, kyber_key())),
        "pq_one_time_prekeys.2": lambda b: b["pq_one_time_prekeys"][2].update(
            public_key=b64(kyber_key())),  # signed over another key
    }
    for field, spoil in cases.items():
        body = keys.upload()
        spoil(body)
        status, err = await api.call("PUT", "/api/keys", token, body)
        assert status == 400 and err["error"]["code"] == "invalid_signature", (field, err)
        assert err["error"]["details"]["field"] == field
    assert await api.call("GET", "/api/keys", token) == (200, {"one_time_prekeys": 0, "pq_one_time_prekeys": 0})
    await upload(api, token, keys, one_time=[], pq=[])
    status, err = await api.call("POST", "/api/keys/prekeys", token,
                                 {"pq_one_time_prekeys": impostor.pq_one_time([5])})
    assert status == 400 and err["error"]["code"] == "invalid_signature"
    status, counts = await api.call("POST", "/api/keys/prekeys", token,
                                    {"one_time_prekeys": keys.one_time([1]), "pq_one_time_prekeys": keys.pq_one_time([5])})
    assert status == 200 and counts == {"one_time_prekeys": 1, "pq_one_time_prekeys": 1}


@pytest.mark.parametrize("settings", [with_settings(prekey_max=8)], ids=["max=8"])
async def test_sizes_ids_and_caps_are_refused_with_nothing_kept(api):
    token, _ = await api.register()
    keys = DeviceKeys()
    status, err = await api.call("POST", "/api/keys/prekeys", token, {"one_time_prekeys": keys.one_time([1])})
    assert status == 409 and err["error"]["code"] == "keys_not_uploaded"
    spoilers = {
        "short identity key": (lambda b: b.update(identity_key=b64(keys.identity_key[:32])), "invalid_key"),
        "identity key of a wrong type": (lambda b: b.update(identity_key=b64(b"\x06" + keys.identity_key[1:])),
                                         "invalid_key"),
        "Kyber key as a signed prekey": (lambda b: b.update(signed_prekey=keys.signed(1, kyber_key())),
                                         "invalid_field"),
        "not base64": (lambda b: b["one_time_prekeys"][0].update(public_key="!" * 44), "invalid_field"),
        "bad padding": (lambda b: b["signed_prekey"].update(signature="A" * 87 + "="), "invalid_key"),
        "key id past u32": (lambda b: b["one_time_prekeys"][0].update(key_id=2**32), "invalid_field"),
        "registration id 0": (lambda b: b.update(registration_id=0), "invalid_field"),
        "a key id twice": (lambda b: b["one_time_prekeys"][1].update(key_id=1), "duplicate_key_id"),
        "101 keys": (lambda b: b.update(one_time_prekeys=keys.one_time(range(101))), "invalid_field"),
        "missing identity key": (lambda b: b.pop("identity_key"), "missing_fields"),
    }
    for name, (spoil, code) in spoilers.items():
        body = keys.upload(one_time=[1, 2], pq=[])
        spoil(body)
        status, err = await api.call("PUT", "/api/keys", token, body)
        assert (status, err["error"]["code"]) == (400, code), (name, err)
    assert await api.call("GET", "/api/keys", token) == (200, {"one_time_prekeys": 0, "pq_one_time_prekeys": 0})
    body = keys.upload(one_time=[1, 2, 3], pq=[1])
    await api.call("PUT", "/api/keys", token, body)
    # A retried request (same keys) changes nothing; another key under a held id is refused, all of it.
    status, counts = await api.call("POST", "/api/keys/prekeys", token, {"one_time_prekeys": body["one_time_prekeys"]})
    assert status == 200 and counts == {"one_time_prekeys": 3, "pq_one_time_prekeys": 1}
    status, err = await api.call("POST", "/api/keys/prekeys", token, {"one_time_prekeys": keys.one_time([4, 3])})
    assert status == 400 and err["error"]["code"] == "duplicate_key_id"
    status, err = await api.call("POST", "/api/keys/prekeys", token, {"one_time_prekeys": keys.one_time(range(4, 10))})
    assert status == 409 and err["error"] == {
        "code": "too_many_prekeys", "message": err["error"]["message"],
        "details": {"field": "one_time_prekeys", "max": 8}}
    assert await api.call("GET", "/api/keys", token) == (200, {"one_time_prekeys": 3, "pq_one_time_prekeys": 1})
    status, counts = await api.call("POST", "/api/keys/prekeys", token, {"one_time_prekeys": keys.one_time(range(4, 9))})
    assert status == 200 and counts["one_time_prekeys"] == 8


async def test_strangers_learn_nothing_and_requesters_cannot_drain(api):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    await upload(api, tb, DeviceKeys(), one_time=[1, 2], pq=[1, 2])
    unknown = await claim(api, tc, "0" * 24)
    assert unknown[0] == 404 and unknown[1]["error"]["code"] == "user_not_found"
    stranger = await claim(api, tc, bob["id"])
    assert stranger[0] == 404 and stranger[1]["error"] == unknown[1]["error"]  # no way to tell them apart
    # A message request Bob has not accepted: enough to open a session, never a one-time key.
    conversation = await api.conversation(tc, bob, accepted=False)
    status, body = await claim(api, tc, bob["id"])
    assert status == 200
    assert body["devices"][0]["one_time_prekey"] is None and body["devices"][0]["pq_prekey"]["key_id"] == 1000
    assert await api.call("GET", "/api/keys", tb) == (200, {"one_time_prekeys": 2, "pq_one_time_prekeys": 2})
    assert (await api.call("POST", f"/api/conversations/{conversation['id']}/accept", tb))[0] == 200
    status, body = await claim(api, tc, bob["id"])
    assert body["devices"][0]["one_time_prekey"]["key_id"] == 1 and body["devices"][0]["pq_prekey"]["key_id"] == 1
    # Blocked, either way: the unknown-user answer again.
    await api.conversation(ta, bob)
    assert (await api.call("POST", f"/api/users/{alice['id']}/block", tb))[0] == 204
    assert (await claim(api, ta, bob["id"]))[1]["error"] == unknown[1]["error"]
    assert (await claim(api, tb, alice["id"]))[1]["error"] == unknown[1]["error"]
    # A deleted account leaves the directory.
    assert (await api.call("DELETE", "/api/auth/me", tb, {"password": "password123"}))[0] == 204
    assert (await claim(api, tc, bob["id"]))[1]["error"] == unknown[1]["error"]


async def test_a_user_claims_their_other_devices_and_a_revoked_one_is_gone(api, ws_url):
    first = await api.register_full()
    user = first["user"]
    status, second = await api.login(user["username"])
    status, third = await api.login(user["username"])
    tp, peer = await api.register()
    await api.conversation(tp, user)
    for body in (first, second, third):
        await upload(api, body["token"], DeviceKeys())
    status, mine = await claim(api, first["token"], user["id"])
    assert status == 200 and [d["device_id"] for d in mine["devices"]] == [2, 3]  # never the caller's own
    status, err = await claim(api, first["token"], user["id"], 1)
    assert status == 404 and err["error"]["code"] == "device_not_found"
    peer_ws = await Ws.connect(ws_url, tp)
    await peer_ws.ok("sync")
    assert (await api.call("DELETE", "/api/devices/3", first["token"]))[0] == 204
    assert (await peer_ws.event("device.removed"))["data"] == {"user_id": user["id"], "device_id": 3}
    status, theirs = await claim(api, tp, user["id"])
    assert [d["device_id"] for d in theirs["devices"]] == [1, 2]
    status, err = await claim(api, tp, user["id"], 3)
    assert status == 404 and err["error"]["code"] == "device_not_found"
    # Its successor (same device id) starts with no keys, then joins the directory.
    status, successor = await api.login(user["username"])
    assert successor["device"]["device_id"] == 3
    assert [d["device_id"] for d in (await claim(api, tp, user["id"]))[1]["devices"]] == [1, 2]
    await upload(api, successor["token"], DeviceKeys())
    assert (await peer_ws.event("device.added"))["data"] == {"user_id": user["id"], "device_id": 3}
    peer_ws.close()


async def test_identity_changes_and_new_devices_reach_contacts_not_strangers(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    tc, carol = await api.register()
    await api.conversation(ta, bob)
    await api.conversation(tc, bob, accepted=False)  # Carol only asked: no contact
    watching = {name: await Ws.connect(ws_url, token) for name, token in (("alice", ta), ("carol", tc))}
    for ws in watching.values():
        await ws.ok("sync")
    keys = DeviceKeys()
    await upload(api, tb, keys)
    assert (await watching["alice"].event("device.added"))["data"] == {"user_id": bob["id"], "device_id": 1}
    # A refused upload (a held key id, another key) leaves the bundle as it was.
    status, err = await api.call("PUT", "/api/keys", tb, keys.upload(signed_id=2, one_time=[1], pq=[]))
    assert status == 400 and err["error"]["code"] == "duplicate_key_id"
    assert (await claim(api, ta, bob["id"]))[1]["devices"][0]["signed_prekey"]["key_id"] == 1
    await upload(api, tb, keys, signed_id=2, one_time=[], pq=[])  # a signed prekey rotation: nothing to tell
    assert (await claim(api, ta, bob["id"]))[1]["devices"][0]["signed_prekey"]["key_id"] == 2
    await watching["alice"].no_event("identity.changed")
    await upload(api, tb, DeviceKeys(), one_time=[], pq=[])  # reinstalled: a new identity, old pools dropped
    assert (await watching["alice"].event("identity.changed"))["data"] == {"user_id": bob["id"], "device_id": 1}
    assert await api.call("GET", "/api/keys", tb) == (200, {"one_time_prekeys": 0, "pq_one_time_prekeys": 0})
    await watching["carol"].no_event("device.added", wait=0.1)
    await watching["carol"].no_event("identity.changed", wait=0.1)
    for ws in watching.values():
        ws.close()


@pytest.mark.parametrize("settings", [with_settings(prekey_low=3)], ids=["low=3"])
async def test_a_device_running_low_is_told_live_and_on_its_next_sync(api, ws_url):
    ta, alice = await api.register()
    tb, bob = await api.register()
    await api.conversation(ta, bob)
    bob_ws = await Ws.connect(ws_url, tb)
    await bob_ws.ok("sync")
    await upload(api, tb, DeviceKeys(), one_time=range(1, 5), pq=range(1, 9))
    await claim(api, ta, bob["id"])  # 3 EC keys left: not below 3
    await bob_ws.no_event("keys.low", wait=0.1)
    await claim(api, ta, bob["id"])
    low = await bob_ws.event("keys.low")
    assert low["data"] == {"one_time_prekeys": 2, "pq_one_time_prekeys": 6, "threshold": 3}
    bob_ws.close()
    await claim(api, ta, bob["id"])  # while Bob is away
    again = await Ws.connect(ws_url, tb)
    await again.ok("sync")
    assert (await again.event("keys.low"))["data"]["one_time_prekeys"] == 1
    status, counts = await api.call("POST", "/api/keys/prekeys", tb,
                                    {"one_time_prekeys": DeviceKeys().one_time(range(10, 20))})
    assert counts == {"one_time_prekeys": 11, "pq_one_time_prekeys": 5}
    await again.ok("sync")
    await again.no_event("keys.low", wait=0.1)  # replenished: nothing to say
    again.close()
