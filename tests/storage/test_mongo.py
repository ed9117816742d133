"""MongoDB-only behaviour: migrations, indexes, persistence, crash recovery, 503s.

The contract suite (test_contract.py) already runs on the `mongo` params; this
file covers what only the Mongo backend has. Tests run against mongoeco's wire
server (`mongo`) and, when `KISSE_TEST_MONGODB_URI` is set, a real MongoDB
(`mongo-real`); the SQLite-restart and dead-server tests need a server of
their own, so they use mongoeco only.
"""
from __future__ import annotations

import asyncio
import socket
import time
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from pymongo import AsyncMongoClient

from kisse.app import make_app, shutdown, startup
from storage import faults
from storage.base import StorageUnavailable, new_id, utcnow
from storage.mongo import MongoStorage, client_options, migrations
from tests import backends, mongo_server
from tests.conftest import TEST_SETTINGS
from tests.storage.test_contract import make_users

# Dead-server tests must answer fast: short selection timeouts.
FAST = "serverSelectionTimeoutMS=500&connectTimeoutMS=500&timeoutMS=500"


@pytest.fixture(params=["mongo", "mongo-real"])
def uri(request) -> str:
    """A URI for a fresh, empty database (dropped afterwards)."""
    value = backends.mongo_uri(request.param)
    yield value

    async def drop() -> None:
        client = AsyncMongoClient(value)
        try:
            await client.drop_database(urlsplit(value).path.lstrip("/"))
        finally:
            await client.close()
    asyncio.run(drop())


@pytest.fixture
def own_server(tmp_path):
    """A private mongoeco server on a SQLite file (so it can be stopped and restarted)."""
    backends.mongo_uri("mongo")  # skips (or fails under CI) when mongoeco cannot run
    server = mongo_server.MongoecoServer(mongo_server.venv_python(),
                                         sqlite_path=str(tmp_path / "kisse.sqlite")).start()
    yield server
    server.stop()


async def opened(uri: str) -> MongoStorage:
    store = MongoStorage(uri)
    await store.start()
    return store


@pytest.fixture
def store(uri, io_loop):
    """A started MongoStorage on the fresh database, closed afterwards."""
    started = io_loop.run_sync(lambda: opened(uri))
    yield started
    io_loop.run_sync(started.close)


# -- migrations and indexes -------------------------------------------------------
@pytest.mark.gen_test
async def test_migrations_bring_an_empty_database_to_the_latest_version_once(uri):
    store = MongoStorage(uri)
    try:
        assert await migrations.schema_version(store.db) == 0
        await store.start()
        schema = await store.db.meta.find_one({"_id": "schema"})
        assert schema["version"] == migrations.LATEST_VERSION
        assert [a["version"] for a in schema["applied"]] == [v for v, _, _ in migrations.MIGRATIONS]
        assert await migrations.migrate(store.db) == 0  # rerun: nothing to do
        await store.start()
        assert await store.db.meta.find_one({"_id": "schema"}) == schema
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_concurrent_starts_migrate_once(uri):
    stores = [MongoStorage(uri) for _ in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in stores))
        schema = await stores[0].db.meta.find_one({"_id": "schema"})
        assert [a["version"] for a in schema["applied"]] == [v for v, _, _ in migrations.MIGRATIONS]
        lock = await stores[0].db.meta.find_one({"_id": "migration_lock"})
        assert lock["owner"] is None  # released
        names = await stores[0].db.users.index_information()
        assert list(names).count("username_lower_unique") == 1
    finally:
        for store in stores:
            await store.close()


@pytest.mark.gen_test
async def test_an_expired_migration_lock_is_taken_over(uri):
    store = MongoStorage(uri)
    try:
        await store.db.meta.insert_one({"_id": "migration_lock", "owner": "dead-process",
                                        "expires_at": utcnow() - timedelta(seconds=1)})
        await store.start()
        assert await migrations.schema_version(store.db) == migrations.LATEST_VERSION
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_indexes_exist(store):
    db = store.db

    async def indexes(name):
        return {n: (info["key"], bool(info.get("unique")))
                for n, info in (await db[name].index_information()).items()}

    users = await indexes("users")
    assert users["username_lower_unique"] == ([("username_lower", 1)], True)
    conversations = await indexes("conversations")
    assert conversations["direct_key_unique"] == ([("direct_key", 1)], True)
    assert conversations["member_recent"][0] == [("participant_ids", 1), ("last_activity_at", -1),
                                                  ("_id", -1)]
    messages = await indexes("messages")
    assert messages["conversation_seq_unique"] == ([("conversation_id", 1), ("seq", 1)], True)
    assert messages["sender_client_id_unique"] == ([("sender_id", 1), ("client_message_id", 1)], True)
    calls = await indexes("calls")
    assert calls["party_status_recent"][0][0] == ("parties", 1)
    assert calls["status_ring_deadline"][0] == [("status", 1), ("ring_deadline", 1)]
    assert (await indexes("encrypted_content.chunks"))["files_id_1_n_1"][1] is True


# -- client settings --------------------------------------------------------------
def test_client_options_keep_url_options_and_default_the_rest():
    options = client_options("mongodb://h/db?serverSelectionTimeoutMS=700&w=1")
    assert "serverSelectionTimeoutMS" not in options  # the URL's value wins
    assert options["timeoutMS"] == 3000 and options["retryWrites"] is True and options["tz_aware"] is True
    assert "timeoutMS" not in client_options("mongodb://h/db?timeoutMS=1500")


@pytest.mark.gen_test
async def test_write_concern_is_majority_unless_the_url_says_otherwise():
    default = MongoStorage("mongodb://127.0.0.1:1/kisse_x")
    explicit = MongoStorage("mongodb://127.0.0.1:1/kisse_x?w=1")
    try:
        assert default.db.name == "kisse_x"
        assert default._messages.write_concern.document == {"w": "majority"}
        assert default._calls.write_concern.document == {"w": "majority"}
        assert explicit._messages.write_concern.document == {"w": 1}
        assert MongoStorage("mongodb://127.0.0.1:1/").db.name == "kisse"
    finally:
        await default.close()
        await explicit.close()


# -- backend-specific concurrency and recovery --------------------------------------
@pytest.mark.gen_test
async def test_last_message_is_the_highest_seq_under_concurrent_sends(store):
    a, b = await make_users(store, "ann", "bea")
    conv, _ = await store.get_or_create_direct(a["id"], b["id"])
    await asyncio.gather(*(store.add_message(conv["id"], a["id"], f"k{i}", b"x", None) for i in range(30)))
    after = await store.get_conversation(conv["id"])
    assert after["last_seq"] == 30 and after["last_message"]["seq"] == 30
    last = await store.get_message(after["last_message"]["id"])
    assert last["seq"] == 30 and after["last_activity_at"] == last["created_at"]
    assert "ciphertext" not in after["last_message"]


@pytest.mark.gen_test
async def test_a_send_that_died_at_any_step_is_finished_by_its_retry_or_by_repair(store):
    a, b = await make_users(store, "cyd", "dee")
    conv, _ = await store.get_or_create_direct(a["id"], b["id"])
    steps = ["mongo.send.written", "mongo.send.allocated", "mongo.send.numbered"]
    for n, step in enumerate(steps):
        faults.arm(step, crash)
        with pytest.raises(Crashed):
            await store.add_message(conv["id"], a["id"], f"retried-{n}", b"x", None)
        faults.disarm()
        message, created = await store.add_message(conv["id"], a["id"], f"retried-{n}", b"x", None)
        assert message["seq"] == n + 1 and created == (step != "mongo.send.numbered")
    # Dead attempts nobody retries: repair finishes them, in the order they were written.
    for n, step in enumerate(steps):
        faults.arm(step, crash)
        with pytest.raises(Crashed):
            await store.add_message(conv["id"], a["id"], f"abandoned-{n}", b"x", None)
        faults.disarm()
    visible, _ = await store.list_messages(conv["id"], after=3)
    # Died after numbering: visible (seq 5); after allocating: seq 4 is taken but not yet visible.
    assert [(m["seq"], m["client_message_id"]) for m in visible] == [(5, "abandoned-2")]
    repaired = await store.repair_sends(utcnow() + timedelta(seconds=1))
    assert [m["client_message_id"] for m in repaired] == ["abandoned-0", "abandoned-1"]  # the third was numbered
    history, _ = await store.list_messages(conv["id"], after=0)
    assert [m["seq"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert sorted(m["client_message_id"] for m in history) == sorted(
        [f"retried-{n}" for n in range(3)] + [f"abandoned-{n}" for n in range(3)])
    assert await store.repair_sends(utcnow() + timedelta(seconds=1)) == []
    assert (await store.get_conversation(conv["id"]))["last_seq"] == 6


@pytest.mark.gen_test
async def test_a_twin_too_late_for_the_number_gives_it_back_or_leaves_a_tombstone(store):
    a, b = await make_users(store, "cyd", "dee")
    conv, _ = await store.get_or_create_direct(a["id"], b["id"])
    faults.arm("mongo.send.written", crash)
    with pytest.raises(Crashed):
        await store.add_message(conv["id"], a["id"], "twin", b"x", None)
    faults.disarm()
    snapshot = await store._messages.find_one({"client_message_id": "twin"})  # read while still pending
    first, created = await store.add_message(conv["id"], a["id"], "twin", b"x", None)
    assert created and first["seq"] == 1
    # The twin allocates after the first one finished: nobody else has sent, so it gives the seq back.
    late, created = await store._number(snapshot)
    assert not created and late == first
    history, _ = await store.list_messages(conv["id"], after=0)
    assert [(m["seq"], m["tombstone"]) for m in history] == [(1, None)]
    conversation = await store.get_conversation(conv["id"])
    assert conversation["last_seq"] == 1 and conversation["last_message"]["seq"] == 1
    # Same, but another message is numbered before the twin can give its seq back: a tombstone.
    seq, _, fresh = await store._allocate(conv["id"], first["id"], {"id": first["id"]})
    assert seq == 2 and fresh
    other, _ = await store.add_message(conv["id"], b["id"], "other", b"y", None)
    assert other["seq"] == 3
    await store._release(conv["id"], first["id"], seq, first["seq"])
    history, _ = await store.list_messages(conv["id"], after=0)
    assert [(m["seq"], m["tombstone"]) for m in history] == [(1, None), (2, "unused"), (3, None)]
    conversation = await store.get_conversation(conv["id"])
    assert conversation["last_seq"] == 3 and conversation["last_message"]["id"] == other["id"]
    assert await store.count_unread(conv["id"], b["id"], 0) == 1  # a tombstone is nothing to read


@pytest.mark.gen_test
async def test_a_late_allocation_nobody_finishes_is_buried_by_repair(store):
    """A storage stall longer than the client timeout: the attempt's allocation reaches
    the server after a retry numbered the message, and nobody is left to release it."""
    a, b = await make_users(store, "cyd", "dee")
    conv, _ = await store.get_or_create_direct(a["id"], b["id"])
    first, _ = await store.add_message(conv["id"], a["id"], "stalled", b"x", None)
    late, _, fresh = await store._allocate(conv["id"], first["id"], {"id": first["id"], "content": None})
    assert late == 2 and fresh
    # Still the last seq: repair gives it back, and last_message is the real message again.
    assert await store.repair_sends(utcnow() - timedelta(seconds=60)) == []  # too young to touch
    assert (await store.get_conversation(conv["id"]))["last_seq"] == 2
    assert await store.repair_sends(utcnow() + timedelta(seconds=1)) == []
    conversation = await store.get_conversation(conv["id"])
    assert conversation["last_seq"] == 1 and conversation["last_message"]["seq"] == 1
    # Not the last any more: a tombstone fills it, and a second repair does nothing more.
    late, _, _ = await store._allocate(conv["id"], first["id"], {"id": first["id"], "content": None})
    other, _ = await store.add_message(conv["id"], b["id"], "after", b"y", None)
    assert (late, other["seq"]) == (2, 3)
    for _ in range(2):
        assert await store.repair_sends(utcnow() + timedelta(seconds=1)) == []
        history, _ = await store.list_messages(conv["id"], after=0)
        assert [(m["seq"], m["tombstone"]) for m in history] == [(1, None), (2, "unused"), (3, None)]
    assert (await store._conversations.find_one({"_id": conv["id"]}))["pending"] == []
    # A retry of the first send after all that is still the one message.
    again, created = await store.add_message(conv["id"], a["id"], "stalled", b"x", None)
    assert again == first and not created


class Crashed(Exception):
    """Stands for the process dying at a step."""


def crash() -> None:
    raise Crashed


@pytest.mark.gen_test
async def test_orphaned_call_lines_do_not_keep_a_user_busy(store):
    a, b, c = await make_users(store, "eli", "fox", "gil")
    # Crashed between claiming b's line and inserting the call: stale entry.
    await store._lines.insert_one({"_id": b["id"], "live": [
        {"call_id": new_id(), "at": utcnow() - timedelta(minutes=5)}]})
    deadline = utcnow() + timedelta(seconds=30)
    call = await store.create_call(a["id"], b["id"], "audio", deadline)
    assert call["status"] == "pending"
    # Ended, but its process died before freeing the lines.
    await store._calls.update_one({"_id": call["id"]}, {"$set": {"status": "ended"}})
    again = await store.create_call(c["id"], b["id"], "audio", deadline)
    assert again["status"] == "pending"
    busy = await store.create_call(a["id"], b["id"], "audio", deadline)
    assert busy["status"] == "busy"


@pytest.mark.gen_test
async def test_racing_callers_to_one_callee_get_one_pending_call(store):
    users = [await store.create_user(f"u{i}", "h", "U") for i in range(9)]
    callee = users[0]
    deadline = utcnow() + timedelta(seconds=30)
    calls = await asyncio.gather(*(store.create_call(u["id"], callee["id"], "audio", deadline)
                                   for u in users[1:]))
    assert sorted(c["status"] for c in calls) == ["busy"] * 7 + ["pending"]
    (pending,) = [c for c in calls if c["status"] == "pending"]
    await store.transition_call(pending["id"], ("pending",), "rejected", {"ended_at": utcnow()})
    after = await store.create_call(users[1]["id"], callee["id"], "video", deadline)
    assert after["status"] == "pending"  # the line was freed


# -- persistence and availability (own mongoeco server) -------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_data_survives_a_sqlite_engine_restart(own_server):
    uri = own_server.uri("kisse")
    store = await opened(uri)
    user = await store.create_user("Persist", "hash", "P")
    writer = await store.open_blob_writer(1_000_000)
    await writer.write(b"z" * 300_000)
    await writer.finish()
    await store.close()

    own_server.stop()
    own_server.start()  # same SQLite file, maybe another port
    store = await opened(own_server.uri("kisse"))
    try:
        assert await store.get_user(user["id"]) == user
        assert (await store.get_credentials("persist"))[1] == "hash"
        data = b"".join([c async for c in store.read_blob(writer.blob_id)])
        assert data == b"z" * 300_000
        assert await migrations.schema_version(store.db) == migrations.LATEST_VERSION
    finally:
        await store.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.gen_test
async def test_ping_against_a_dead_server_is_unavailable_quickly():
    store = MongoStorage(f"mongodb://127.0.0.1:{closed_port()}/kisse?{FAST}")
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await store.ping()
        assert time.monotonic() - started < 3
        with pytest.raises(store.unavailable_errors):
            await store.get_user("a" * 24)
    finally:
        await store.close()


@pytest.fixture
def app(own_server, io_loop):
    """The app on a private mongoeco server the test can stop and restart."""
    port = own_server.port
    store = MongoStorage(own_server.uri("kisse", serverSelectionTimeoutMS="500", connectTimeoutMS="500", timeoutMS="1000"))
    application = make_app(TEST_SETTINGS, store)
    io_loop.run_sync(lambda: startup(application))
    application.test_server, application.test_port = own_server, port
    yield application
    io_loop.run_sync(lambda: shutdown(application, grace=0))


@pytest.mark.gen_test(timeout=60)
async def test_api_answers_503_json_while_mongo_is_down_and_recovers(app, api):
    server = app.test_server
    status, _ = await api.call("POST", "/api/auth/register", body={"username": "upper", "password": "pw-123456789"})
    assert status == 201
    server.stop()
    started = time.monotonic()
    status, body = await api.call("POST", "/api/auth/login", body={"username": "upper", "password": "pw-123456789"})
    assert status == 503 and body["error"]["code"] == "storage_unavailable"
    status, body = await api.call("GET", "/readyz")
    assert status == 503
    assert time.monotonic() - started < 5
    # Back on the same port and file: the client reconnects by itself.
    server.port = app.test_port
    server.start()
    for _ in range(50):
        status, _ = await api.call("GET", "/readyz")
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    status, body = await api.call("POST", "/api/auth/login", body={"username": "upper", "password": "pw-123456789"})
    assert status == 200, body
