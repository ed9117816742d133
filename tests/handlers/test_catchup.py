"""Catch-up is paced by the client's reading, and a reading client is never cut."""
from __future__ import annotations

import asyncio
import base64
import os

import pytest

from tests.rawws import RawWs

pytestmark = pytest.mark.gen_test(timeout=120)


async def test_a_slow_reader_gets_the_whole_catch_up_then_the_ack(api, http_port, settings):
    ta, a = await api.register()
    tb, b = await api.register()
    conversation = await api.conversation(ta, b)
    big = base64.b64encode(os.urandom(settings.max_inline_ciphertext)).decode()  # ~87 KB frames
    backlog, live = 150, 20
    for n in range(backlog):
        await api.send(ta, conversation["id"], f"old{n}", big)
    assert backlog * len(big) > 3 * settings.ws_queue_bytes  # unpaced, it would overflow the queue
    reader = await RawWs.connect(http_port, tb, receive_buffer=64 * 1024)
    reader.send("sync", {"cursors": {conversation["id"]: 0}}, "s1")

    async def meanwhile():  # live traffic while the catch-up runs
        await asyncio.sleep(0.3)
        for n in range(live):
            await api.send(ta, conversation["id"], f"new{n}", big)
            await api.call("POST", "/api/presence", ta, {"status": "away" if n % 2 else "online"})

    sender = asyncio.ensure_future(meanwhile())
    seqs, acked_after = [], None
    while len(seqs) < backlog + live or acked_after is None:
        frame = await asyncio.wait_for(reader.json(), 30)  # a closed connection raises here
        if frame["type"] == "message.new":
            seqs.append(frame["data"]["seq"])
        elif frame["type"] == "ack" and frame.get("id") == "s1":
            acked_after = len(seqs)
        await asyncio.sleep(0.02)  # a reader at 50 frames/s
    assert seqs == list(range(1, backlog + live + 1))  # everything, once, in order
    assert acked_after is not None and acked_after >= backlog  # the ack follows the catch-up
    reader.send("ping", {}, "p1")
    while (frame := await asyncio.wait_for(reader.json(), 30))["type"] != "pong":
        pass
    reader.close()
    await sender
