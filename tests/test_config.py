"""Configuration: env vars → settings, and how `python -m kisse` reacts to bad ones."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    ({"KISSE_JWT_TTL": "-5"}, "KISSE_JWT_TTL"),
    ({"KISSE_BCRYPT_ROUNDS": "40"}, "KISSE_BCRYPT_ROUNDS"),
    ({"KISSE_ENV": "staging"}, "KISSE_ENV"),
    ({"KISSE_ENV": "production"}, "KISSE_JWT_SECRET"),
    ({"KISSE_ENV": "production", "KISSE_JWT_SECRET": "short"}, "KISSE_JWT_SECRET"),
    ({"KISSE_MAX_BODY": "1.5"}, "KISSE_MAX_BODY"),
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
    ({"KISSE_JWT_TTL": "-1"}, "KISSE_JWT_TTL"),
])
def test_cli_refuses_bad_settings_in_one_line(env, variable):
    result = run_kisse(env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr


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
