"""Configuration: env vars → settings, and how `python -m kisse` reacts to bad ones."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from config.settings import Settings, SettingsError
from storage import create_storage
from storage.memory import MemoryStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults():
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.storage) == ("0.0.0.0", 8080, "memory://")
    assert settings.bcrypt_rounds == 12 and settings.env == "development" and settings.max_body == 1024 * 1024
    assert settings.jwt_secret_generated and len(settings.jwt_secret) >= 32


@pytest.mark.parametrize("env,variable", [
    ({"KISSE_PORT": "eighty"}, "KISSE_PORT"),
    ({"KISSE_PORT": "70000"}, "KISSE_PORT"),
    ({"KISSE_STORAGE": "redis://x"}, "KISSE_STORAGE"),
    ({"KISSE_ACCESS_TTL": "-5"}, "KISSE_ACCESS_TTL"),
    ({"KISSE_MAX_DEVICES": "0"}, "KISSE_MAX_DEVICES"),
    ({"KISSE_BCRYPT_ROUNDS": "40"}, "KISSE_BCRYPT_ROUNDS"),
    ({"KISSE_ENV": "staging"}, "KISSE_ENV"),
    ({"KISSE_ENV": "production"}, "KISSE_JWT_SECRET"),
    ({"KISSE_ENV": "production", "KISSE_JWT_SECRET": "short"}, "KISSE_JWT_SECRET"),
    ({"KISSE_MAX_BODY": "1.5"}, "KISSE_MAX_BODY"),
    ({"KISSE_ENV": "production", "KISSE_JWT_SECRET": "x" * 40, "KISSE_BCRYPT_ROUNDS": "9"}, "KISSE_BCRYPT_ROUNDS"),
])
def test_invalid_settings_name_the_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_production_accepts_a_long_secret():
    settings = Settings.from_env({"KISSE_ENV": "production", "KISSE_JWT_SECRET": "s" * 32})
    assert settings.jwt_secret == "s" * 32 and not settings.jwt_secret_generated


def test_create_storage_by_scheme():
    assert isinstance(create_storage("memory://"), MemoryStorage)
    with pytest.raises(ValueError, match="unknown storage scheme"):
        create_storage("sqlite:///x.db")


def run_kisse(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kisse", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


@pytest.mark.parametrize("env,variable", [
    ({"KISSE_PORT": "abc"}, "KISSE_PORT"),
    ({"KISSE_STORAGE": "ftp://nowhere"}, "KISSE_STORAGE"),
    ({"KISSE_ACCESS_TTL": "-1"}, "KISSE_ACCESS_TTL"),
])
def test_cli_refuses_bad_settings_in_one_line(env, variable):
    result = run_kisse(env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr


def test_unreachable_mongodb_at_start_up_is_one_line_naming_kisse_storage():
    url = f"mongodb://kisse:s3cret-pass@127.0.0.1:{free_port()}/kisse?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    result = run_kisse({"KISSE_STORAGE": url})
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("{")]  # JSON logs aside
    assert len(lines) == 1 and lines[0].startswith("kisse: KISSE_STORAGE: cannot reach"), result.stderr
    assert "Traceback" not in result.stderr and "s3cret-pass" not in result.stderr


def test_every_setting_is_an_option_documented_with_its_default():
    from config.settings import OPTIONS
    fields = {f.name for f in dataclasses.fields(Settings)} - {"jwt_secret_generated"}
    assert {o.field for o in OPTIONS} == fields
    readme = open(os.path.join(ROOT, "README.md")).read()
    example = open(os.path.join(ROOT, "config", "example.env")).read()
    for option in OPTIONS:
        default = ",".join(option.default) if isinstance(option.default, tuple) else str(option.default)
        assert f"| `{option.env}` | `{default}` |" in readme, f"{option.env} is not in the README table"
        assert f"{option.env}={default}\n" in example, f"{option.env} is not in config/example.env"


def test_cli_help_lists_every_option():
    from config.settings import OPTIONS
    result = run_kisse({}, "--help")
    assert result.returncode == 0
    for option in OPTIONS:
        assert option.env in result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_starts_serves_and_stops_cleanly(signum):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kisse"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "KISSE_PORT": str(port), "KISSE_HOST": "127.0.0.1"})
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.05)
        process.send_signal(signum)
        assert process.wait(timeout=15) == 0
        stderr = process.stderr.read()
        assert "tokens won't survive a restart" in stderr
        assert "Traceback" not in stderr
    finally:
        process.kill()


def test_served_server_accepts_uploads_beyond_the_json_limit():
    """`python -m kisse` caps JSON bodies at KISSE_MAX_BODY, yet content uploads
    may be up to KISSE_MAX_BLOB: the upload handler raises the cap per request."""
    import json

    port = free_port()
    env = {**os.environ, "KISSE_PORT": str(port), "KISSE_HOST": "127.0.0.1", "KISSE_BCRYPT_ROUNDS": "4",
           "KISSE_MAX_BODY": "65536", "KISSE_MAX_BLOB": str(4 * 1024 * 1024)}
    process = subprocess.Popen([sys.executable, "-m", "kisse"], cwd=ROOT, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"

    def call(method, path, token=None, body=None, raw=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else raw
        request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                call("GET", "/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        tokens, ids = [], []
        for name in ("uploader", "receiver"):
            status, body = call("POST", "/api/auth/register", body={"username": name, "password": "password123"})
            tokens.append(json.loads(body)["token"])
            ids.append(json.loads(body)["user"]["id"])
        _, body = call("POST", "/api/conversations", tokens[0], {"participant_ids": [ids[1]]})
        conversation_id = json.loads(body)["conversation"]["id"]
        _, body = call("POST", "/api/messages", tokens[0], {"conversation_id": conversation_id,
                                                            "client_message_id": "big"})
        message_id = json.loads(body)["message"]["id"]
        data = os.urandom(3 * 1024 * 1024)
        status, body = call("POST", f"/api/messages/{message_id}/content", tokens[0], raw=data)
        assert status == 201, body
        status, body = call("GET", f"/api/messages/{message_id}/content", tokens[1])
        assert status == 200 and body == data
        status, body = call("POST", "/api/auth/login", raw=b"{" + b" " * 70000 + b"}")
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    finally:
        process.terminate()
        process.wait(timeout=15)
