"""Encrypted content: streamed upload, streamed ranged download."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
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
    for header in ("bytes=600000-", "bytes=700000-700010", "bytes=-0", "bytes=" + "9" * 5000 + "-"):
        response = await get(header)
        assert response.code == 416, header
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"
    for header in ("bytes=0-1,5-6", "items=0-5", "bytes=abc", "bytes=5-2", " bytes=1-2x"):
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


async def test_head_and_conditional_get(api):
    ta, tb, message = await setup_message(api)
    data = os.urandom(70_000)
    await api.call("POST", f"/api/messages/{message['id']}/content", ta, raw=data)
    path = f"/api/messages/{message['id']}/content"
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    status, body = await api.call("HEAD", path, tb)
    assert status == 200 and body == b""
    response = await api.http.fetch(HTTPRequest(api.base_url + path, method="HEAD",
                                                headers={"Authorization": f"Bearer {tb}"}))
    assert response.headers["Content-Length"] == str(len(data)) and response.headers["ETag"] == etag
    assert response.headers["Accept-Ranges"] == "bytes"
    for match in (etag, f'"other", {etag}', "*"):
        for method in ("GET", "HEAD"):
            status, body = await api.call(method, path, tb, headers={"If-None-Match": match})
            assert status == 304 and body == b"", (method, match)
    status, body = await api.call("GET", path, tb, headers={"If-None-Match": '"stale"'})
    assert status == 200 and body == data
    assert (await api.call("HEAD", f"/api/messages/{'0' * 24}/content", tb))[0] == 404


async def test_empty_uploads_and_empty_blobs(api):
    ta, tb, message = await setup_message(api)
    path = f"/api/messages/{message['id']}/content"
    status, body = await api.call("POST", path, ta, raw=b"")
    assert status == 400 and body["error"]["code"] == "empty_content"
    status, body = await stream_upload(api, ta, message["id"], b"")  # chunked, no length: empty too
    assert status == 400 and body["error"]["code"] == "empty_content"
    # Nothing was attached: the real upload still goes through.
    status, _ = await api.call("POST", path, ta, raw=b"the real one")
    assert status == 201
    _, reader, empty_inline = await setup_message(api, b"")  # a 0-byte inline ciphertext is legal
    url = f"{api.base_url}/api/messages/{empty_inline['id']}/content"
    response = await api.http.fetch(HTTPRequest(url, headers={"Authorization": f"Bearer {reader}", "Range": "bytes=-5"}),
                                    raise_error=False)
    # No byte to select: 416 with the size, never "bytes 0--1/0".
    assert response.code == 416 and response.headers["Content-Range"] == "bytes */0"
    assert (await api.call("GET", url.removeprefix(api.base_url), reader)) == (200, b"")


async def test_a_second_upload_in_progress_is_refused_before_its_body(api, storage, backend, http_port):
    ta, tb, message = await setup_message(api)
    size, piece = 8 * MIB, 64 * 1024
    path = f"/api/messages/{message['id']}/content"
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ta}\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    # The first upload starts and stays open, its body half sent.
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(head + b"u" * (size // 2))
    await writer.drain()
    # Each later one is answered before it sends its body (Expect: 100-continue, as
    # HTTP clients do for large uploads)...
    expect = head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
    for _ in range(5):
        r, w = await asyncio.open_connection("127.0.0.1", http_port)
        w.write(expect)
        response = await asyncio.wait_for(r.read(), 5)  # the server answers and closes
        status_line, _, rest = response.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 409"), response[:200]
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "upload_in_progress"
        w.close()
    # ...and one that sends its body anyway is cut off long before the body is in
    # (what it managed to send is what the kernels' socket buffers took, a few MiB).
    declared = 64 * MIB
    r, w = await asyncio.open_connection("127.0.0.1", http_port)
    w.write(head.replace(str(size).encode(), str(declared).encode()))
    sent = 0
    with pytest.raises(ConnectionError):
        while sent < declared:
            w.write(b"v" * piece)
            await asyncio.wait_for(w.drain(), 10)
            sent += piece
    assert sent < declared // 2, f"the server took {sent} bytes of a refused upload"
    w.close()
    writer.write(b"u" * (size // 2))
    await writer.drain()
    status_line = (await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip()
    assert status_line.startswith(b"HTTP/1.1 201"), status_line
    writer.close()
    assert (await api.call("GET", path, tb)) == (200, b"u" * size)
    if backend == "memory":
        assert len(storage._blobs) == 1
