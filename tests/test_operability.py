"""Metrics, structured logs that keep secrets out, and graceful shutdown."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os

import pytest

from kisse.app import shutdown
from kisse.logs import RequestIdFilter, json_formatter, quiet_libraries
from tests.client import Ws

pytestmark = pytest.mark.gen_test
PASSWORD = "Zebra-Quokka-7731-secret"


@pytest.fixture
def captured():
    """Every log line of the app, formatted exactly as production writes it."""
    lines: list[str] = []
    formatter = json_formatter()

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(formatter.format(record))

    handler = Capture(level=logging.DEBUG)
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    quiet_libraries()  # as setup_logging() does in production
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


async def test_logs_never_contain_passwords_tokens_or_blob_bytes(api, ws_url, captured):
    _, body = await api.call("POST", "/api/auth/register", body={"username": "logcheck", "password": PASSWORD})
    token = body["token"]
    _, login = await api.call("POST", "/api/auth/login", body={"username": "logcheck", "password": PASSWORD})
    await api.call("POST", "/api/auth/login", body={"username": "logcheck", "password": PASSWORD + "x"})
    tb, b = await api.register()
    conv = await api.conversation(token, b)
    blob = b"BLOBMARKER-" + os.urandom(64).hex().encode()
    inline = b"INLINEMARKER-ciphertext"
    message = await api.send(token, conv["id"], "log1", base64.b64encode(inline).decode())
    other = await api.send(token, conv["id"], "log2")
    await api.call("POST", f"/api/messages/{other['id']}/content", token, raw=blob)
    await api.call("GET", f"/api/messages/{other['id']}/content", tb)
    ws = await Ws.connect(ws_url, login["token"])
    await ws.ok("sync")
    await ws.ok("message.send", {"conversation_id": conv["id"], "client_message_id": "log3",
                                 "ciphertext": base64.b64encode(inline).decode()})
    ws.conn.write_message("{broken")
    await ws.event("error")
    ws.close()
    await api.call("GET", "/api/auth/me", "forged.token.value")
    await asyncio.sleep(0.05)
    assert len(captured) >= 10
    secrets = [PASSWORD, token, login["token"], blob.decode(), "BLOBMARKER", "INLINEMARKER",
               base64.b64encode(inline).decode(), "forged.token.value"]
    for line in captured:
        for secret in secrets:
            assert secret not in line, f"log line leaks a secret: {line}"
    # Every line is JSON with a request id.
    records = [json.loads(line) for line in captured]
    assert all("request_id" in r for r in records)
    access = [r for r in records if r["logger"] == "kisse.access"]
    assert access and all(r["request_id"] != "-" for r in access)
    assert any(r.get("path") == "/ws" for r in access)
    del message


async def test_metrics_are_prometheus_text(api, ws_url):
    token, a = await api.register()
    tb, b = await api.register()
    conv = await api.conversation(token, b)
    ws = await Ws.connect(ws_url, tb)
    await ws.ok("sync")
    message = await api.send(token, conv["id"], "m1")
    await api.call("POST", f"/api/messages/{message['id']}/content", token, raw=b"12345")
    await api.call("POST", "/api/calls", token, {"callee_id": b["id"], "media": "audio"})
    status, text = await api.call("GET", "/metrics")
    assert status == 200
    text = text.decode()
    assert "kisse_ws_connections 1.0" in text
    assert "kisse_messages_total 1.0" in text
    assert 'kisse_blob_bytes_total{direction="in"} 5.0' in text
    assert 'kisse_ws_frames_total{direction="in",type="sync"} 1.0' in text
    assert 'kisse_ws_frames_total{direction="out",type="message.new"} 1.0' in text
    assert 'kisse_http_request_duration_seconds_count{method="POST",route="/api/messages",status="201"} 1.0' in text
    await api.call("POST", "/api/calls", tb, {"callee_id": a["id"], "media": "audio"})  # A is busy
    status, text = await api.call("GET", "/metrics")
    assert 'kisse_call_outcomes_total{status="busy"} 1.0' in text.decode()
    ws.close()


async def test_shutdown_closes_websockets_with_1001(api, ws_url, app):
    token, _ = await api.register()
    ws = await Ws.connect(ws_url, token)
    await ws.ok("ping")
    await shutdown(app, grace=0.5)
    assert await asyncio.wait_for(ws.closed, 5) == 1001


async def test_request_id_is_echoed(api):
    response = await api.http.fetch(api.base_url + "/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    response = await api.http.fetch(api.base_url + "/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert response.headers["X-Request-ID"] != "bad id with spaces" and len(response.headers["X-Request-ID"]) == 16
