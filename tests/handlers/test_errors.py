"""Every error is JSON with the right status; no stack trace reaches a client."""
from __future__ import annotations

import pytest

from tests.conftest import with_settings

pytestmark = pytest.mark.gen_test


async def test_unknown_route_is_404_json(api):
    status, body = await api.call("GET", "/api/nope")
    assert status == 404 and body["error"]["code"] == "route_not_found"


async def test_wrong_method_is_405_json(api):
    status, body = await api.call("DELETE", "/api/auth/login")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("raw,code", [
    (b"{not json", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b"[1, 2]", "invalid_field"),
    (b'{"username": 5, "password": "password123"}', "invalid_field"),
    (b'{"username": "eve"}', "missing_fields"),
    (b'{"username": "eve", "password": ["password123"]}', "invalid_field"),
])
async def test_bad_bodies_are_400(api, raw, code):
    status, body = await api.call("POST", "/api/auth/register", raw=raw)
    assert status == 400 and body["error"]["code"] == code
    assert "Traceback" not in body["error"]["message"]


async def test_missing_fields_are_named(api):
    status, body = await api.call("POST", "/api/auth/login", body={})
    assert status == 400 and body["error"]["details"]["fields"] == ["password", "username"]
    assert "password" in body["error"]["message"] and "username" in body["error"]["message"]


@pytest.fixture
def settings():
    return with_settings(max_body=1024)


async def test_body_over_limit_is_413(api):
    status, body = await api.call("POST", "/api/auth/register", raw=b'{"username": "' + b"a" * 2000 + b'"}')
    assert status == 413 and body["error"]["code"] == "payload_too_large"


async def test_chunked_body_over_limit_is_413(api):
    async def producer(write):
        for _ in range(3):
            await write(b"x" * 600)

    from tornado.httpclient import HTTPRequest
    request = HTTPRequest(api.base_url + "/api/auth/login", method="POST", body_producer=producer)
    response = await api.http.fetch(request, raise_error=False)
    assert response.code == 413


async def test_bad_query_values_are_400(api):
    token, _ = await api.register()
    for path in ("/api/users?limit=abc", "/api/users?limit=0", "/api/conversations?before=nonsense"):
        status, body = await api.call("GET", path, token)
        assert status == 400, path
        assert body["error"]["code"] == "invalid_query"
