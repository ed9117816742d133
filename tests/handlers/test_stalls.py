"""Storage that stalls (an election, a slow disk) must not cost live clients their connection."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.client import Ws
from tests.stall import StallableStorage

pytestmark = pytest.mark.gen_test


@pytest.fixture
def storage(storage):
    """Every backend, behind a switch that holds each storage call."""
    return StallableStorage(storage)


async def test_a_storage_stall_longer_than_two_pings_drops_nobody(api, ws_url, storage, settings):
    ta, a = await api.register()
    tb, b = await api.register()
    conv = await api.conversation(ta, b)
    wa, wb = await Ws.connect(ws_url, ta), await Ws.connect(ws_url, tb)
    await wa.ok("sync")
    await wb.ok("sync")
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
