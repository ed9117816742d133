"""Forward compatibility: a newer client's unknown fields are ignored, never stored or echoed;
known fields keep every check (docs/API.md, "Evolving the API")."""
from __future__ import annotations

import json

import pytest

from kisse.validation import MAX_PROPERTIES
from tests.client import pair
from tests.conftest import with_settings

pytestmark = pytest.mark.gen_test


async def test_rest_ignores_unknown_fields_and_keeps_checking_known_ones(api):
    status, body = await api.call("POST", "/api/auth/register", body={
        "username": "newapp", "password": "password123", "device_model": "Pixel 42", "referral": {"a": [1]}})
    assert status == 201, body
    assert set(body["user"]) == {"id", "username", "display_name", "created_at"}
    token = body["token"]
    _, other = await api.register()
    conversation = await api.conversation(token, other)
    status, body = await api.call("POST", "/api/messages", token, {
        "conversation_id": conversation["id"], "client_message_id": "m1", "client_version": "9.9",
        "reactions": ["🙂"]})
    assert status == 201, body
    assert "client_version" not in json.dumps(body) and "reactions" not in body["message"]
    _, history = await api.call("GET", f"/api/conversations/{conversation['id']}/messages", token)
    assert "client_version" not in json.dumps(history)  # never stored
    # Known fields are still checked, whatever else comes along.
    status, body = await api.call("POST", "/api/messages", token, {
        "conversation_id": conversation["id"], "client_message_id": "x" * 65, "client_version": "9.9"})
    assert status == 400 and body["error"]["details"]["field"] == "client_message_id"
    # Unknown fields are not unbounded.
    crowded = {"username": "crowd", "password": "password123", **{f"f{n}": n for n in range(MAX_PROPERTIES)}}
    status, body = await api.call("POST", "/api/auth/register", body=crowded)
    assert status == 400 and body["error"]["code"] == "invalid_field"


async def test_websocket_ignores_unknown_data_and_envelope_fields(api, ws_url):
    (ta, a, wa), (tb, b, wb), conversation = await pair(api, ws_url)
    wa.conn.write_message(json.dumps({"type": "message.send", "id": "n1", "trace": "abc", "data": {
        "conversation_id": conversation["id"], "client_message_id": "w1", "ephemeral_hint": True}}))
    ack = await wa.event("ack")
    assert ack["id"] == "n1" and ack["data"]["created"] and "ephemeral_hint" not in json.dumps(ack)
    pushed = await wb.event("message.new")
    assert "ephemeral_hint" not in json.dumps(pushed)
    # Unknown types are still errors, and known fields still checked, over the WebSocket too.
    reply = await wa.request("message.react", {"message_id": pushed["data"]["id"]})
    assert reply["data"]["code"] == "unknown_type"
    reply = await wa.request("message.send", {"conversation_id": 7, "client_message_id": "w2", "x": 1})
    assert reply["data"]["code"] == "invalid_field" and reply["data"]["details"]["field"] == "conversation_id"
    reply = await wa.request("message.send", "not an object")
    assert reply["data"]["code"] == "invalid_field" and reply["data"]["message"].startswith("data")
    wa.close()
    wb.close()


async def test_capabilities_tell_a_client_the_limits_and_timers(api, settings):
    status, body = await api.call("GET", "/api/capabilities")  # no token needed
    assert status == 200
    assert body["api_version"] == 1 and body["version"]
    limits, timers = body["limits"], body["timers"]
    assert limits["max_body_bytes"] == settings.max_body
    assert limits["max_inline_ciphertext_bytes"] == settings.max_inline_ciphertext
    assert limits["max_blob_bytes"] == settings.max_blob
    assert limits["max_ws_frame_bytes"] == settings.max_ws_frame
    assert limits["max_signal_bytes"] == settings.max_signal
    assert limits["max_group_members"] == settings.max_group_members
    assert timers == {"ws_ping_seconds": settings.ws_ping, "presence_grace_seconds": settings.presence_grace,
                      "typing_timeout_seconds": settings.typing_timeout,
                      "call_ring_timeout_seconds": settings.call_ring_timeout,
                      "access_token_ttl_seconds": settings.access_ttl,
                      "refresh_token_ttl_seconds": settings.refresh_ttl,
                      "retention_days": settings.retention_days,
                      "last_seen_precision_seconds": settings.last_seen_precision}
    assert limits["message_ttl_min_seconds"] == settings.min_message_ttl and limits["message_ttl_max_seconds"] == 365 * 86400
    assert body["features"]["turn"] is True and body["features"]["key_directory"] is True


@pytest.mark.parametrize("settings", [with_settings(turn_secret="", turn_uris=(), max_body=4096)], ids=["no-turn"])
async def test_capabilities_follow_the_settings(api):
    body = (await api.call("GET", "/api/capabilities"))[1]
    assert body["features"]["turn"] is False and body["limits"]["max_body_bytes"] == 4096
