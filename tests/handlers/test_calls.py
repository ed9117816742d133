"""Calls: the state machine, races, busy, signalling relay, sweep, TURN."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import pytest

from kisse.app import make_app, startup
from tests.client import Ws
from tests.conftest import with_settings

pytestmark = pytest.mark.gen_test


async def contacts(api, n=2):
    """n users who all share one conversation: [(token, user), ...]."""
    people = [await api.register() for _ in range(n)]
    await api.conversation(people[0][0], *(u for _, u in people[1:]))
    return people


async def start(api, caller_token, callee, media="audio"):
    status, body = await api.call("POST", "/api/calls", caller_token, {"callee_id": callee["id"], "media": media})
    assert status == 201, body
    return body["call"]


async def act(api, token, call, action):
    return await api.call("POST", f"/api/calls/{call['id']}/{action}", token)


async def test_accept_then_end_records_times_and_duration(api):
    (ta, a), (tb, b) = await contacts(api)
    call = await start(api, ta, b, "video")
    assert call["status"] == "pending" and call["media"] == "video" and call["answered_at"] is None
    status, body = await act(api, tb, call, "accept")
    assert status == 200 and body["call"]["status"] == "accepted" and body["call"]["answered_at"]
    status, active = await api.call("GET", "/api/calls/active", ta)
    assert [c["id"] for c in active["calls"]] == [call["id"]]
    await asyncio.sleep(0.05)
    status, body = await act(api, ta, call, "end")
    ended = body["call"]
    assert status == 200 and ended["status"] == "ended" and ended["ended_by"] == a["id"]
    assert ended["duration"] >= 0.04 and ended["ended_at"] >= ended["answered_at"]
    assert (await api.call("GET", "/api/calls/active", tb))[1]["calls"] == []
    status, history = await api.call("GET", "/api/calls/history", tb)
    assert [c["id"] for c in history["calls"]] == [call["id"]]


async def test_reject_cancel_and_forbidden_transitions(api):
    (ta, a), (tb, b) = await contacts(api)
    tx, x = await api.register()
    call = await start(api, ta, b)
    assert (await act(api, ta, call, "accept"))[0] == 409  # the caller can't accept
    assert (await act(api, tb, call, "cancel"))[0] == 409  # the callee can't cancel
    assert (await act(api, tb, call, "end"))[0] == 409     # not accepted yet
    for action in ("accept", "reject", "cancel", "end"):  # a third party: as if it didn't exist
        status, body = await act(api, tx, call, action)
        assert status == 404 and body["error"]["code"] == "call_not_found"
    status, body = await act(api, tb, call, "reject")
    assert body["call"]["status"] == "rejected" and body["call"]["end_reason"] == "rejected"
    status, body = await act(api, tb, call, "accept")
    assert status == 409 and body["error"]["code"] == "invalid_transition"
    assert body["error"]["details"]["status"] == "rejected"
    second = await start(api, ta, b)
    status, body = await act(api, ta, second, "cancel")
    assert body["call"]["status"] == "missed" and body["call"]["end_reason"] == "cancelled"
    assert (await act(api, ta, {"id": "0" * 24}, "end"))[0] == 404


async def test_calling_a_stranger_is_403_and_yourself_or_nobody_404(api):
    (ta, a), _ = await contacts(api)
    _, x = await api.register()
    status, body = await api.call("POST", "/api/calls", ta, {"callee_id": x["id"], "media": "audio"})
    assert status == 403 and body["error"]["code"] == "not_a_contact"
    for callee in (a, {"id": "0" * 24}):
        status, body = await api.call("POST", "/api/calls", ta, {"callee_id": callee["id"], "media": "audio"})
        assert status == 404, callee
    status, body = await api.call("POST", "/api/calls", ta, {"callee_id": a["id"], "media": "smell"})
    assert status == 400


async def test_busy_callee(api, ws_url):
    (ta, a), (tb, b), (tc, c) = await contacts(api, 3)
    wc = await Ws.connect(ws_url, tc)
    first = await start(api, ta, b)
    busy = await start(api, tc, b)
    assert busy["status"] == "busy" and busy["end_reason"] == "busy"
    assert (await wc.event("call.state"))["data"]["status"] == "busy"  # the caller's devices are told at once
    await act(api, tb, first, "accept")
    assert (await start(api, tc, a))["status"] == "busy"  # A is in an accepted call
    await act(api, ta, first, "end")
    assert (await start(api, tc, b))["status"] == "pending"


async def test_ring_timeout_makes_missed_and_tells_both(api, ws_url, settings):
    (ta, a), (tb, b) = await contacts(api)
    wa, wb = await Ws.connect(ws_url, ta), await Ws.connect(ws_url, tb)
    call = await start(api, ta, b)
    assert (await wb.event("call.incoming"))["data"]["id"] == call["id"]
    started = time.monotonic()
    missed_a = await _last_state(wa, call["id"])
    missed_b = await _last_state(wb, call["id"])
    assert missed_a == missed_b
    assert missed_a["status"] == "missed" and missed_a["end_reason"] == "timeout"
    assert time.monotonic() - started >= settings.call_ring_timeout * 0.7


async def test_unconnected_callee_sees_the_missed_call_in_history(api, settings):
    (ta, a), (tb, b) = await contacts(api)
    call = await start(api, ta, b)
    await asyncio.sleep(settings.call_ring_timeout + 0.3)
    status, history = await api.call("GET", "/api/calls/history", tb)
    assert [(c["id"], c["status"]) for c in history["calls"]] == [(call["id"], "missed")]


@pytest.mark.parametrize("settings", [with_settings(call_ring_timeout=0.05, call_sweep_interval=60)],
                         ids=["ring=50ms"])
async def test_races_have_exactly_one_winner(api, ws_url):
    (ta, a), (tb, b) = await contacts(api)
    wa = await Ws.connect(ws_url, ta)
    wb1, wb2 = await Ws.connect(ws_url, tb), await Ws.connect(ws_url, tb)
    outcomes: dict[str, int] = {}
    iterations = 30
    for i in range(iterations):
        call = await start(api, ta, b)
        await asyncio.sleep([0.03, 0.045, 0.05, 0.055][i % 4])  # land near the ring deadline
        results = await asyncio.gather(
            wb1.request("call.accept", {"call_id": call["id"]}),
            wb2.request("call.accept", {"call_id": call["id"]}),
            act(api, ta, call, "cancel"))
        acks = [r for r in results[:2] if r["type"] == "ack"]
        cancel_ok = results[2][0] == 200
        assert len(acks) + cancel_ok <= 1
        final = (await api.call("GET", f"/api/calls/{call['id']}", ta))[1]["call"]
        if final["status"] == "pending":  # nobody won yet: the ring timer will
            await asyncio.sleep(0.1)
            final = (await api.call("GET", f"/api/calls/{call['id']}", ta))[1]["call"]
        winners = len(acks) + cancel_ok + (final["end_reason"] == "timeout")
        assert winners == 1, (results, final)
        outcomes[final["end_reason"] or final["status"]] = outcomes.get(final["end_reason"] or final["status"], 0) + 1
        # Everyone is told the same final state.
        state_a = await _last_state(wa, call["id"])
        assert state_a["status"] == final["status"]
        if final["status"] == "accepted":
            await act(api, ta, call, "end")
            await _last_state(wa, call["id"])
    assert sum(outcomes.values()) == iterations
    print(f"call race outcomes over {iterations} iterations: {outcomes}")


async def _last_state(ws: Ws, call_id: str) -> dict:
    while True:
        event = await ws.event("call.state")
        if event["data"]["id"] == call_id and event["data"]["status"] != "pending":
            return event["data"]


async def test_all_callee_devices_ring_and_the_others_stop(api, ws_url):
    (ta, a), (tb, b) = await contacts(api)
    wa = await Ws.connect(ws_url, ta)
    wb1, wb2 = await Ws.connect(ws_url, tb), await Ws.connect(ws_url, tb)
    call = (await wa.ok("call.start", {"callee_id": b["id"], "media": "audio"}))["call"]
    for device in (wb1, wb2):
        assert (await device.event("call.incoming"))["data"]["id"] == call["id"]
    await wb1.ok("call.accept", {"call_id": call["id"]})
    assert (await wb2.event("call.answered_elsewhere"))["data"]["id"] == call["id"]
    await wb1.no_event("call.answered_elsewhere", 0.1)
    assert (await _last_state(wa, call["id"]))["status"] == "accepted"


async def test_signalling_relays_only_between_the_parties(api, ws_url, settings):
    (ta, a), (tb, b), (tc, c) = await contacts(api, 3)
    wa, wc = await Ws.connect(ws_url, ta), await Ws.connect(ws_url, tc)
    wb1, wb2 = await Ws.connect(ws_url, tb), await Ws.connect(ws_url, tb)
    call = (await wa.ok("call.start", {"callee_id": b["id"], "media": "video"}))["call"]
    offer = {"sdp": "v=0 opaque offer", "type": "offer"}
    assert (await wa.ok("call.offer", {"call_id": call["id"], "payload": offer}))["delivered_to"] == 2
    for device in (wb1, wb2):
        event = await device.event("call.offer")
        assert event["data"] == {"call_id": call["id"], "from_user_id": a["id"], "payload": offer}
    await wb2.ok("call.accept", {"call_id": call["id"]})
    await wa.ok("call.ice", {"call_id": call["id"], "payload": {"candidate": "c1"}})
    assert (await wb2.event("call.ice"))["data"]["payload"] == {"candidate": "c1"}
    await wb1.no_event("call.ice", 0.1)  # only the device that answered
    await wb2.ok("call.answer", {"call_id": call["id"], "payload": {"sdp": "answer"}})
    assert (await wa.event("call.answer"))["data"]["from_user_id"] == b["id"]
    reply = await wc.request("call.ice", {"call_id": call["id"], "payload": {"candidate": "evil"}})
    assert reply["type"] == "error" and reply["data"]["code"] == "call_not_found"
    reply = await wa.request("call.offer", {"call_id": call["id"], "payload": "x" * (settings.max_signal + 1)})
    assert reply["type"] == "error" and reply["data"]["code"] == "signal_too_large"
    deep: list = []
    for _ in range(300):  # valid JSON, deeper than the 255 levels a payload may nest
        deep = [deep]
    reply = await wa.request("call.ice", {"call_id": call["id"], "payload": deep})
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_field"
    ended = (await wb2.ok("call.hangup", {"call_id": call["id"], "payload": {"reason": "bye"}}))["call"]
    assert ended["status"] == "ended"
    assert (await wa.event("call.hangup"))["data"]["payload"] == {"reason": "bye"}
    reply = await wa.request("call.ice", {"call_id": call["id"], "payload": {}})
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_transition"


async def test_restart_sweep_marks_overdue_calls_missed(app, api, storage, settings):
    (ta, a), (tb, b) = await contacts(api)
    call = await start(api, ta, b)
    # The server dies with the call ringing: no ring timer and no sweep of its own will run.
    first = app.settings["kisse"]
    await first.tasks.close()
    first.calls.stop()
    await asyncio.sleep(settings.call_ring_timeout + 0.2)
    assert (await storage.get_call(call["id"]))["status"] == "pending"  # nobody resolved it
    # A new server on the same storage: its sweep at start-up resolves the orphan.
    fresh = make_app(with_settings(call_sweep_interval=60), storage)
    await startup(fresh)
    try:
        deadline = time.monotonic() + 3
        while (await storage.get_call(call["id"]))["status"] == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        missed = await storage.get_call(call["id"])
        assert missed["status"] == "missed" and missed["end_reason"] == "timeout"
        assert await fresh.settings["kisse"].calls.sweep() == 0  # nothing left to do
    finally:
        await fresh.settings["kisse"].tasks.close()


async def test_turn_credentials(api, settings):
    (token, user), (callee_token, callee) = await contacts(api)
    status, body = await api.call("GET", "/api/calls/turn", token)
    assert status == 409 and body["error"]["code"] == "no_live_call"  # no call, no relay
    call = await start(api, token, callee)
    assert (await api.call("GET", "/api/calls/turn", callee_token))[0] == 200  # ringing: both parties
    status, body = await api.call("GET", "/api/calls/turn", token)
    assert status == 200 and body["uris"] == list(settings.turn_uris) and body["ttl"] == settings.turn_ttl
    expiry, user_id = body["username"].split(":")
    assert user_id == user["id"] and abs(int(expiry) - time.time() - settings.turn_ttl) < 5
    expected = base64.b64encode(hmac.new(settings.turn_secret.encode(), body["username"].encode(),
                                         hashlib.sha1).digest()).decode()
    assert body["password"] == expected
    await act(api, token, call, "cancel")
    assert (await api.call("GET", "/api/calls/turn", token))[0] == 409


@pytest.mark.parametrize("settings", [with_settings(turn_secret="", turn_uris=())], ids=["no-turn"])
async def test_turn_not_configured_is_clear(api):
    token, _ = await api.register()
    status, body = await api.call("GET", "/api/calls/turn", token)
    assert status == 404 and body["error"]["code"] == "turn_not_configured"
