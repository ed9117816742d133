"""A send that failed part-way is answered by its retry: once, in order, published once."""
from __future__ import annotations


import pytest

from storage import faults
from storage.base import StorageUnavailable
from tests.client import Ws, pair

pytestmark = pytest.mark.gen_test

STEPS = {"memory": ["memory.send.stored"],
         "mongo": ["mongo.send.written", "mongo.send.allocated", "mongo.send.numbered"]}


def lose_the_reply() -> None:
    raise StorageUnavailable("the connection to storage dropped before the answer")


@pytest.fixture(autouse=True)
def no_faults_left():
    yield
    faults.disarm()


async def test_a_retried_send_after_a_failure_at_any_step_lands_once(api, ws_url, backend):
    (ta, a, wa), (tb, b, wb), conversation = await pair(api, ws_url)
    for n, step in enumerate(STEPS.get(backend, STEPS["mongo"])):
        faults.arm(step, lose_the_reply)
        reply = await wa.request("message.send", {"conversation_id": conversation["id"], "client_message_id": step})
        assert reply["type"] == "error" and reply["data"]["code"] == "storage_unavailable"
        faults.disarm()
        reply = await wa.request("message.send", {"conversation_id": conversation["id"], "client_message_id": step})
        assert reply["type"] == "ack" and reply["data"]["message"]["seq"] == n + 1, reply
        pushed = await wb.event("message.new")
        assert pushed["data"]["client_message_id"] == step and pushed["data"]["seq"] == n + 1
        await wb.no_event("message.new", 0.2)  # once
    _, history = await api.call("GET", f"/api/conversations/{conversation['id']}/messages", tb)
    assert [m["seq"] for m in history["messages"]] == list(range(1, len(STEPS.get(backend, STEPS["mongo"])) + 1))
    wa.close()
    wb.close()


async def test_a_send_nobody_retries_is_finished_and_published_by_the_server(api, ws_url, backend, settings):
    if backend == "memory":
        pytest.skip("the memory backend stores a message in one step: nothing is ever left half-done")
    ta, a = await api.register()
    tb, b = await api.register()
    conversation = await api.conversation(ta, b)
    wb = await Ws.connect(ws_url, tb)
    await wb.ok("sync")
    faults.arm("mongo.send.allocated", lose_the_reply)
    status, _ = await api.call("POST", "/api/messages", ta, {"conversation_id": conversation["id"],
                                                             "client_message_id": "abandoned"})
    assert status == 503
    faults.disarm()
    pushed = await wb.event("message.new", timeout=settings.send_repair_after * 4 + 10)
    assert pushed["data"]["client_message_id"] == "abandoned" and pushed["data"]["seq"] == 1
