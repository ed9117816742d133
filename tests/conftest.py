"""Shared fixtures: settings with short timers, storage parametrized over every
backend, the app built through `make_app`, and small HTTP/WS client helpers."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from config.settings import Settings
from kisse.app import make_app, shutdown, startup
from tests import backends
from tests.client import Api

# Fast bcrypt and short timers: behaviour is the same, the suite stays quick.
TEST_SETTINGS = Settings(
    jwt_secret="test-secret-that-is-long-enough-for-hs256!",
    bcrypt_rounds=4,
    presence_grace=0.3,
    typing_timeout=0.3,
    ws_ping=0.3,
    ws_sync_grace=0.5,
    call_ring_timeout=1.0,
    call_sweep_interval=0.2,
    send_repair_after=0.5,
    turn_secret="turn-shared-secret",
    turn_uris=("turn:turn.example.org:3478?transport=udp",),
    rate_limits="off",  # tests of the limits turn them on (tests/test_limits.py)
    min_message_ttl=1,
    forget_sweep_interval=0.2,
)


@pytest.fixture(params=backends.names())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def storage(backend, io_loop):
    """A fresh, empty, started storage of each backend."""
    store = io_loop.run_sync(lambda: backends.open_storage(backend))
    yield store
    io_loop.run_sync(store.close)


@pytest.fixture
def settings() -> Settings:
    return TEST_SETTINGS


@pytest.fixture
def app(settings, storage, io_loop):
    application = make_app(settings, storage)
    io_loop.run_sync(lambda: startup(application))
    yield application
    try:
        io_loop.run_sync(lambda: shutdown(application, grace=0), timeout=30)
    except TimeoutError:
        import sys
        for task in asyncio.all_tasks(io_loop.asyncio_loop):
            task.print_stack(file=sys.stderr)
        raise
    io_loop.run_sync(lambda: asyncio.sleep(0.01))  # let cancelled heartbeats finish before the loop closes


def with_settings(**changes) -> Settings:
    return dataclasses.replace(TEST_SETTINGS, **changes)


@pytest.fixture
def api(app, http_client, base_url):
    return Api(http_client, base_url)


@pytest.fixture
def ws_url(http_port) -> str:
    return f"ws://localhost:{http_port}/ws"
