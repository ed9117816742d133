"""Storage that stalls (an election, a slow disk) must not cost live clients their connection."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from kisse.app import shutdown
from storage.base import StorageUnavailable
from tests.client import WAIT, Ws, pair
from tests.stall import StallableStorage

pytestmark = pytest.mark.gen_test


@pytest.fixture
def storage(storage):
    """Every backend, behind a switch that holds each storage call."""
    return StallableStorage(storage)


async def test_a_storage_stall_longer_than_two_pings_drops_nobody(api, ws_url, storage, settings):
    (ta, a, wa), (tb, b, wb), conv = await pair(api, ws_url)
    storage.stall()
    count = 40  # more than the 16 a connection may have waiting: the server stops reading
    for n in range(count):
        wa.conn.write_message(json.dumps({"type": "message.send", "id": f"s{n}", "data": {
            "conversation_id": conv["id"], "client_message_id": f"stall-{n}"}}))
    stall = settings.ws_ping * 3
    await asyncio.sleep(stall)
    assert storage.waiting >= 1, "the sends never reached storage"
    assert not wa.closed.done() and not wb.closed.done(), "a client was dropped during the stall"
    storage.resume()
    acks = [await wa.event("ack", timeout=30) for _ in range(count)]
    assert [f["data"]["message"]["seq"] for f in acks] == list(range(1, count + 1))
    assert [(await wb.event("message.new", timeout=30))["data"]["seq"] for _ in range(count)] == \
        list(range(1, count + 1))
    # And nobody is cut after the stall either, for several intervals.
    await asyncio.sleep(settings.ws_ping * 4)
    assert not wa.closed.done() and not wb.closed.done()
    assert (await wa.request("ping"))["type"] == "pong"


async def test_a_send_stuck_on_storage_holds_back_its_conversation_only(api, ws_url, storage):
    ta, a = await api.register()
    tb, b = await api.register()
    tc, c = await api.register()
    first = await api.conversation(ta, b)
    other = await api.conversation(ta, c)
    wa = await Ws.connect(ws_url, ta)
    await wa.ok("sync")
    storage.stall(only={"add_message"})
    wa.conn.write_message(json.dumps({"type": "message.send", "id": "s1", "data": {
        "conversation_id": first["id"], "client_message_id": "stuck"}}))
    wa.conn.write_message(json.dumps({"type": "message.send", "id": "s2", "data": {
        "conversation_id": first["id"], "client_message_id": "behind"}}))
    # Neither a ping nor a request about another conversation waits for it.
    assert (await wa.request("ping"))["type"] == "pong"
    assert (await wa.request("typing.start", {"conversation_id": other["id"]}))["type"] == "ack"
    assert storage.waiting == 1  # the second send of that conversation waits its turn, unstarted
    storage.resume()
    acks = [await wa.event("ack"), await wa.event("ack")]
    assert [f["id"] for f in acks] == ["s1", "s2"]
    assert [f["data"]["message"]["seq"] for f in acks] == [1, 2]


async def test_a_client_gone_during_a_slow_handshake_leaves_no_ghost(app, api, ws_url, storage, settings):
    ta, a = await api.register()
    tb, b = await api.register()
    await api.conversation(ta, b)
    wb = await Ws.connect(ws_url, tb)
    hub = app.settings["kisse"].hub
    storage.stall(only={"get_session"})
    port = int(ws_url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"GET /ws?token={ta} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    while storage.waiting == 0:  # the handshake is stuck on storage
        await asyncio.sleep(0.01)
    writer.close()  # the client gives up
    await asyncio.sleep(0.1)
    storage.resume()
    await asyncio.sleep(settings.presence_grace + 0.5)
    assert not hub.is_connected(a["id"]) and hub.count() == 1  # wb only
    _, text = await api.call("GET", "/metrics")
    assert "kisse_ws_connections 1.0" in text.decode()
    status, body = await api.call("GET", f"/api/presence/{a['id']}", tb)
    assert body["presence"]["status"] == "offline"
    wb.close()


async def test_shutdown_answers_the_requests_it_took_then_closes_with_1001(app, api, ws_url, storage):
    ta, a = await api.register()
    tb, b = await api.register()
    conversation = await api.conversation(ta, b)
    wa = await Ws.connect(ws_url, ta)
    await wa.ok("sync")
    storage.stall(only={"add_message"})
    for n in range(5):
        wa.conn.write_message(json.dumps({"type": "message.send", "id": f"t{n}", "data": {
            "conversation_id": conversation["id"], "client_message_id": f"taken-{n}"}}))
    [connection] = app.settings["kisse"].hub.all()
    while connection._lanes.active < 5:  # all five taken (one stuck on storage, four behind it)
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(shutdown(app, grace=10))
    await asyncio.sleep(0.1)
    late = await wa.request("ping")  # arrives while draining: refused, so it can go elsewhere
    assert late["type"] == "error" and late["data"]["code"] == "shutting_down"
    storage.resume()
    acks = [await wa.event("ack") for _ in range(5)]
    assert [f["data"]["message"]["seq"] for f in acks] == [1, 2, 3, 4, 5]
    assert await asyncio.wait_for(wa.closed, WAIT) == 1001  # after the answers
    await stopping


async def _task_failures(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    for _ in range(200):
        found = [r for r in caplog.records if r.name == "kisse.tasks"]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"no background failure logged: {caplog.text}")


async def test_background_work_finding_storage_unavailable_logs_a_line_not_a_traceback(api, ws_url, storage,
                                                                                        caplog):
    """In a storage stall every connection's presence update fails: a traceback each made
    megabytes of log (seen at 5,000 reconnecting sockets). A bug still shows its traceback."""
    caplog.set_level(logging.WARNING, logger="kisse.tasks")
    ta, _ = await api.register()
    tb, _ = await api.register()
    storage.fail(StorageUnavailable("the primary stepped down"), only={"set_presence"})
    wa = await Ws.connect(ws_url, ta)  # announcing A's presence runs in the background, and fails
    await wa.ok("sync")
    [record] = await _task_failures(caplog, 1)
    assert record.getMessage() == "presence announce failed: storage unavailable (StorageUnavailable)"
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert (await wa.request("ping"))["type"] == "pong"  # the connection never noticed

    storage.fail(RuntimeError("a bug"), only={"set_presence"})
    wb = await Ws.connect(ws_url, tb)
    await wb.ok("sync")
    record = (await _task_failures(caplog, 2))[1]
    assert record.getMessage() == "presence announce failed" and record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    storage.fail(None, set())
    wa.close()
    wb.close()
