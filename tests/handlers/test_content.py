"""Encrypted content: streamed upload, streamed ranged download."""
from __future__ import annotations

import base64
import hashlib
import os

import pytest
from tornado.httpclient import HTTPRequest

from tests.conftest import with_settings

pytestmark = pytest.mark.gen_test
MIB = 1024 * 1024


async def setup_message(api, inline: bytes | None = None):
    ta, a = await api.register()
    tb, b = await api.register()
    conv = await api.conversation(ta, b)
    message = await api.send(ta, conv["id"], os.urandom(8).hex(),
                             base64.b64encode(inline).decode() if inline is not None else None)
    return ta, tb, message


async def stream_upload(api, token, message_id, data: bytes, piece: int = 256 * 1024):
    """Upload with chunked transfer encoding, the way a client streams a file."""
    async def producer(write):
        for i in range(0, len(data), piece):
            await write(data[i:i + piece])

    request = HTTPRequest(f"{api.base_url}/api/messages/{message_id}/content", method="POST",
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
                          body_producer=producer, request_timeout=120)
    response = await api.http.fetch(request, raise_error=False)
    import json
    return response.code, json.loads(response.body) if response.body else None


async def test_twenty_mib_round_trip_streamed(api, storage, backend):
    ta, tb, message = await setup_message(api)
    data = os.urandom(20 * MIB)
    status, body = await stream_upload(api, ta, message["id"], data)
    assert status == 201, body
    assert body == {"message_id": message["id"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "inline": False}
    if backend == "memory":
        # The server wrote the body in many chunks as they arrived, never whole.
        assert storage.stats["blob_writes"] >= 20 and storage.stats["largest_blob_write"] <= 1 * MIB
    status, raw = await api.call("GET", f"/api/messages/{message['id']}/content", tb)
    assert status == 200 and hashlib.sha256(raw).hexdigest() == body["sha256"] and len(raw) == len(data)
    status, history = await api.call("GET", f"/api/conversations/{message['conversation_id']}/messages", tb)
    assert history["messages"][0]["content"]["sha256"] == body["sha256"]


async def test_upload_rules(api):
    ta, tb, message = await setup_message(api)
    path = f"/api/messages/{message['id']}/content"
    status, body = await api.call("POST", path, tb, raw=b"not yours")
    assert status == 403 and body["error"]["code"] == "not_sender"
    status, _ = await api.call("POST", path, ta, raw=b"first bytes")
    assert status == 201
    status, body = await api.call("POST", path, ta, raw=b"first bytes")
    assert status == 200 and body["sha256"] == hashlib.sha256(b"first bytes").hexdigest()
    status, body = await api.call("POST", path, ta, raw=b"other bytes")
    assert status == 409 and body["error"]["code"] == "content_exists"
    status, raw = await api.call("GET", path, tb)
    assert raw == b"first bytes"
    _, _, inline = await setup_message(api, b"inline")
    status, body = await api.call("POST", f"/api/messages/{inline['id']}/content", ta, raw=b"x")
    assert status in (404, 409)


async def test_inline_content_downloads_too(api):
    ta, tb, message = await setup_message(api, b"small sealed box")
    status, raw = await api.call("GET", f"/api/messages/{message['id']}/content", tb)
    assert status == 200 and raw == b"small sealed box"
    status, raw = await api.call("GET", f"/api/messages/{message['id']}/content", tb, headers={"Range": "bytes=6-"})
    assert status == 206 and raw == b"sealed box"


async def test_no_content_is_404(api):
    ta, tb, message = await setup_message(api)
    status, body = await api.call("GET", f"/api/messages/{message['id']}/content", tb)
    assert status == 404 and body["error"]["code"] == "content_not_found"


async def test_range_requests(api):
    ta, tb, message = await setup_message(api)
    data = os.urandom(600_000)
    await api.call("POST", f"/api/messages/{message['id']}/content", ta, raw=data)
    url = api.base_url + f"/api/messages/{message['id']}/content"

    async def get(range_header):
        request = HTTPRequest(url, headers={"Authorization": f"Bearer {tb}", "Range": range_header})
        return await api.http.fetch(request, raise_error=False)

    cases = {"bytes=0-0": (0, 1), "bytes=100-199": (100, 200), "bytes=-10": (len(data) - 10, len(data)),
             "bytes=599990-": (599_990, len(data)), "bytes=500000-9999999": (500_000, len(data)),
             "bytes=-9999999": (0, len(data))}
    for header, (start, end) in cases.items():
        response = await get(header)
        assert response.code == 206, header
        assert response.body == data[start:end], header
        assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
        assert response.headers["Content-Length"] == str(end - start)
        assert response.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    for header in ("bytes=600000-", "bytes=700000-700010", "bytes=-0", "bytes=5-2"):
        response = await get(header)
        assert response.code == 416, header
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"
    for header in ("bytes=0-1,5-6", "items=0-5", "bytes=abc"):
        response = await get(header)  # unsupported syntax: the whole body, as RFC 9110 allows
        assert response.code == 200 and response.body == data, header


@pytest.mark.parametrize("settings", [with_settings(max_blob=1 * MIB)], ids=["max_blob=1MiB"])
async def test_oversized_upload_is_413_and_leaves_nothing(api, storage, backend):
    ta, tb, message = await setup_message(api)
    path = f"/api/messages/{message['id']}/content"
    # Declared too large: refused before reading.
    status, body = await api.call("POST", path, ta, raw=b"z" * (MIB + 1))
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    # Streamed without a length: refused once it passes the limit.
    status, body = await stream_upload(api, ta, message["id"], b"z" * (MIB + 300_000), piece=64 * 1024)
    assert status == 413 and body["error"]["code"] == "blob_too_large"
    status, _ = await api.call("GET", path, tb)
    assert status == 404
    if backend == "memory":
        assert storage._blobs == {}  # no partial blob kept
    status, _ = await api.call("POST", path, ta, raw=b"fits")
    assert status == 201
