"""Accounts and tokens through HTTP."""
from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from tests.conftest import TEST_SETTINGS

pytestmark = pytest.mark.gen_test


async def test_register_login_me(api):
    status, body = await api.call("POST", "/api/auth/register",
                                  body={"username": "Alice", "password": "correct horse", "display_name": "Al"})
    assert status == 201
    assert body["token_type"] == "Bearer" and body["expires_at"].endswith("Z")
    assert body["user"]["username"] == "alice" and body["user"]["display_name"] == "Al"
    assert set(body["user"]) == {"id", "username", "display_name", "created_at"}
    status, login = await api.call("POST", "/api/auth/login", body={"username": "alice", "password": "correct horse"})
    assert status == 200 and login["user"] == body["user"]
    status, me = await api.call("GET", "/api/auth/me", login["token"])
    assert status == 200 and me == {"user": body["user"]}


async def test_token_claims_are_complete(api):
    token, user = await api.register()
    claims = jwt.decode(token, TEST_SETTINGS.jwt_secret, algorithms=["HS256"])
    assert claims["sub"] == user["id"] and {"did", "sid", "iat", "exp", "jti"} <= set(claims)
    assert claims["did"] == 1 and claims["exp"] - claims["iat"] == TEST_SETTINGS.access_ttl


async def test_username_taken_case_insensitively(api):
    _, bob = await api.register("Bob")
    assert bob["username"] == "bob"  # stored in its canonical, lower-case form
    status, body = await api.call("POST", "/api/auth/register", body={"username": "bob", "password": "password123"})
    assert status == 409 and body["error"]["code"] == "username_taken"
    status, body = await api.call("POST", "/api/auth/login", body={"username": "BOB", "password": "password123"})
    assert status == 200 and body["user"]["id"] == bob["id"]


# Lookalikes that Unicode case folding or a lenient `$` would have let in.
@pytest.mark.parametrize("lookalike", ["alice\n", "al\u0131ce", "al\u0130ce", "\u017fam", "\u212aim"],
                         ids=["newline", "dotless-i", "dotted-I", "long-s", "kelvin-sign"])
async def test_lookalike_usernames_are_refused_and_squat_nobody(api, lookalike):
    status, body = await api.call("POST", "/api/auth/register", body={"username": lookalike, "password": "password123"})
    assert status == 400 and body["error"]["code"] == "invalid_username"
    plain = lookalike.replace("\n", "").replace("\u0131", "i").replace("\u0130", "i").replace(
        "\u017f", "s").replace("\u212a", "k").lower()
    status, body = await api.call("POST", "/api/auth/register", body={"username": plain, "password": "password123"})
    assert status == 201, body  # the real owner of the name still gets it
    status, _ = await api.call("POST", "/api/auth/login", body={"username": lookalike, "password": "password123"})
    assert status == 401  # and the lookalike never opens their account


@pytest.mark.parametrize("username,password,code", [
    ("ab", "password123", "invalid_username"),
    ("x" * 33, "password123", "invalid_username"),
    ("bad name", "password123", "invalid_username"),
    ("émile", "password123", "invalid_username"),
    ("carol", "short", "weak_password"),
    ("carol", "é" * 37, "password_too_long"),
    ("carol", "p" * 73, "password_too_long"),
])
async def test_register_rejects_bad_credentials(api, username, password, code):
    status, body = await api.call("POST", "/api/auth/register", body={"username": username, "password": password})
    assert status == 400 and body["error"]["code"] == code


async def test_password_of_exactly_72_bytes_works(api):
    password = "p" * 72
    await api.register("maxlen", password)
    status, _ = await api.call("POST", "/api/auth/login", body={"username": "maxlen", "password": password})
    assert status == 200
    # A longer password that shares the first 72 bytes must not log in (no silent truncation).
    status, _ = await api.call("POST", "/api/auth/login", body={"username": "maxlen", "password": password + "x"})
    assert status == 401


async def test_login_failures_are_indistinguishable(api):
    await api.register("dave", "password123")
    wrong = await api.call("POST", "/api/auth/login", body={"username": "dave", "password": "wrong-password"})
    unknown = await api.call("POST", "/api/auth/login", body={"username": "nobody", "password": "wrong-password"})
    assert wrong == unknown
    assert wrong[0] == 401 and wrong[1]["error"]["code"] == "invalid_credentials"


def forge(claims: dict, secret: str = TEST_SETTINGS.jwt_secret, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def unsigned(claims: dict) -> str:
    def part(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


# The HS512 forgery signs with the server's own (HS256-sized) secret, on purpose.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_bad_tokens_are_401(api, storage):
    token, user = await api.register()
    claims = jwt.decode(token, TEST_SETTINGS.jwt_secret, algorithms=["HS256"])
    now = int(time.time())
    good = {"sub": user["id"], "did": claims["did"], "sid": claims["sid"], "iat": now, "exp": now + 60, "jti": "x"}
    assert (await api.call("GET", "/api/auth/me", forge(good)))[0] == 200  # the forgery kit works
    bad_tokens = {
        "forged": (forge(good, secret="another-secret-another-secret-123"), "invalid_token"),
        "alg_none": (unsigned(good), "invalid_token"),
        "hs512": (forge(good, algorithm="HS512"), "invalid_token"),
        "expired": (forge({**good, "iat": now - 120, "exp": now - 60}), "token_expired"),
        "no_sub": (forge({k: v for k, v in good.items() if k != "sub"}), "invalid_token"),
        "no_session": (forge({k: v for k, v in good.items() if k != "sid"}), "invalid_token"),
        "unknown_user": (forge({**good, "sub": "f" * 24}), "session_revoked"),
        "other_device": (forge({**good, "did": 2}), "session_revoked"),
        "unknown_session": (forge({**good, "sid": "e" * 24}), "session_revoked"),
        "garbage": ("not.a.token", "invalid_token"),
    }
    for name, (bad, code) in bad_tokens.items():
        status, body = await api.call("GET", "/api/auth/me", bad)
        assert status == 401 and body["error"]["code"] == code, name
    status, body = await api.call("GET", "/api/auth/me")
    assert status == 401 and body["error"]["code"] == "missing_token"
    status, body = await api.call("GET", "/api/auth/me", headers={"Authorization": "Basic abc"})
    assert status == 401
    assert (await api.call("GET", "/api/auth/me", token))[0] == 200


async def test_unknown_users_are_verified_against_a_hash_made_at_start_up(app, settings):
    # Made before any request, so the first unknown-user login costs one bcrypt like the rest.
    dummy = app.settings["kisse"].dummy_hash
    assert dummy is not None and dummy.startswith(f"$2b$0{settings.bcrypt_rounds}$")


async def test_health_and_ready(api):
    assert await api.call("GET", "/healthz") == (200, {"status": "ok"})
    assert await api.call("GET", "/readyz") == (200, {"status": "ready", "bus": {"bus": "local", "state": "ok"}})
