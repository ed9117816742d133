"""Cluster mode: three real `python -m kisse` processes on one MongoDB (mongoeco)
and one redis-server behave as one server. Timers are short (lease 1.5 s,
presence grace 0.5 s); every wait is a generous deadline."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as redis_client
from tornado.httpclient import AsyncHTTPClient

from kisse.hub import Hub
from kisse.redis_bus import RedisBus

from tests import mongo_server, redis_server, traffic
from tests.client import WAIT, Api, Ws
from tests.conftest import TEST_SETTINGS
from tests.prekeys import DeviceKeys
from tests.served import KisseProcess
from tests.traffic import TrafficClient, clock

JWT_SECRET = "cluster-test-secret-that-is-long-enough-for-hs256"
LEASE = 1.5
GRACE = 0.5

pytestmark = pytest.mark.gen_test(timeout=120)


def _needs() -> None:
    for reason in (redis_server.unavailable_reason(), mongo_server.unavailable_reason()):
        if reason:
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)


@pytest.fixture
def cluster(tmp_path) -> Iterator[dict[str, Any]]:
    _needs()
    redis = redis_server.RedisServer().start()
    database = f"kisse_cluster_{uuid.uuid4().hex[:8]}"
    env = {"KISSE_STORAGE": mongo_server.shared_server().uri(database), "KISSE_BUS": redis.url,
           "KISSE_JWT_SECRET": JWT_SECRET, "KISSE_BUS_LEASE": str(LEASE), "KISSE_PRESENCE_GRACE": str(GRACE),
           "KISSE_CALL_RING_TIMEOUT": "2", "KISSE_CALL_SWEEP_INTERVAL": "0.3", "KISSE_WS_PING": "5",
           "KISSE_PREKEY_LOW": "3"}
    nodes = []
    try:
        for i in range(3):
            log = open(tmp_path / f"node{i + 1}.log", "w")  # noqa: SIM115 - the process holds it
            nodes.append(KisseProcess(env, stderr=log).start())
        yield {"redis": redis, "nodes": nodes, "env": env}
    finally:
        for node in nodes:
            node.stop()
        redis.stop()


def ws_url(node: KisseProcess) -> str:
    return node.base.replace("http://", "ws://") + "/ws"


def api(node: KisseProcess) -> Api:
    return Api(AsyncHTTPClient(), node.base)


async def friends(node: KisseProcess) -> tuple[Api, tuple[str, dict], tuple[str, dict], dict]:
    a = api(node)
    alice, bob = await a.register(), await a.register()
    conversation = await a.conversation(alice[0], bob[1])
    return a, alice, bob, conversation


async def test_every_live_event_crosses_nodes(cluster):
    n1, n2, n3 = cluster["nodes"]
    a, (ta, alice), (tb, bob), conv = await friends(n1)
    wa = await Ws.connect(ws_url(n1), ta)
    wb = await Ws.connect(ws_url(n2), tb)
    wb2 = await Ws.connect(ws_url(n3), tb)  # bob's second device, on a third node
    try:
        for ws in (wa, wb, wb2):
            await ws.request("sync", {})
        # Presence: bob, on nodes 2 and 3, shows online to alice through node 1.
        status, seen = await a.call("GET", f"/api/presence/{bob['id']}", ta)
        assert status == 200 and seen["presence"]["status"] == "online"
        sent = (await wa.request("message.send", {"conversation_id": conv["id"], "client_message_id": "x1",
                                                  "ciphertext": "AAEC"}))["data"]["message"]
        for ws in (wb, wb2):
            assert (await ws.event("message.new"))["data"]["id"] == sent["id"]
        await wb.request("message.read", {"message_id": sent["id"]})
        assert (await wa.event("message.receipt"))["data"]["read_seq"] == 1
        assert (await wb2.event("message.receipt"))["data"]["user_id"] == bob["id"]  # his other device
        await wa.request("typing.start", {"conversation_id": conv["id"]})
        assert (await wb.event("typing.start"))["data"]["user_id"] == alice["id"]
        await wb.request("presence.set", {"status": "busy"})
        assert (await wa.event("presence"))["data"]["status"] == "busy"
        # A call rings both of bob's devices; he answers on node 3; signalling reaches that device only.
        call = (await wa.request("call.start", {"callee_id": bob["id"], "media": "audio"}))["data"]["call"]
        for ws in (wb, wb2):
            assert (await ws.event("call.incoming"))["data"]["id"] == call["id"]
        await wb2.request("call.accept", {"call_id": call["id"]})
        assert (await wa.event("call.state"))["data"]["status"] == "accepted"
        assert (await wb.event("call.answered_elsewhere"))["data"]["id"] == call["id"]
        await wa.request("call.offer", {"call_id": call["id"], "payload": {"sdp": "v=0"}})
        assert (await wb2.event("call.offer"))["data"]["payload"] == {"sdp": "v=0"}
        await wb.no_event("call.offer", 0.3)
        await wa.request("call.hangup", {"call_id": call["id"]})
        assert (await wb2.event("call.state"))["data"]["status"] == "ended"
        # Revoking bob's node-2 device from node 1 closes it there with 4003, within a second.
        devices = (await a.call("GET", "/api/devices", tb))[1]["devices"]
        assert len(devices) == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await a.call("POST", "/api/auth/logout", tb))[0] == 204
        assert await asyncio.wait_for(wb.closed, WAIT) == 4003
        assert await asyncio.wait_for(wb2.closed, WAIT) == 4003
        assert loop.time() - started < 1.0
    finally:
        for ws in (wa, wb, wb2):
            ws.close()


async def test_key_directory_events_reach_the_right_device_on_any_node(cluster):
    n1, n2, n3 = cluster["nodes"]
    a, (ta, alice), (tb, bob), conv = await friends(n1)
    status, second = await a.login(bob["username"])
    assert status == 200
    wa, wb1, wb2 = (await Ws.connect(ws_url(n1), ta), await Ws.connect(ws_url(n2), tb),
                    await Ws.connect(ws_url(n3), second["token"]))
    try:
        for ws in (wa, wb1, wb2):
            await ws.request("sync", {})
        status, _ = await a.call("PUT", "/api/keys", tb, DeviceKeys().upload(one_time=range(1, 5), pq=range(1, 5)))
        assert status == 200
        for ws in (wa, wb2):  # his contact, and his own other device
            assert (await ws.event("device.added"))["data"] == {"user_id": bob["id"], "device_id": 1}
        claim = api(n3)  # served where bob's other device is, not the one it concerns
        assert (await claim.call("GET", f"/api/keys/{bob['id']}/1", ta))[0] == 200  # 3 left: not below 3
        await wb1.no_event("keys.low", 0.3)
        assert (await claim.call("GET", f"/api/keys/{bob['id']}/1", ta))[0] == 200
        assert (await wb1.event("keys.low"))["data"]["one_time_prekeys"] == 2  # on node 2, that device only
        await wb2.no_event("keys.low", 0.3)
        assert (await a.call("POST", "/api/auth/logout", second["token"]))[0] == 204
        assert (await wa.event("device.removed"))["data"] == {"user_id": bob["id"], "device_id": 2}
    finally:
        for ws in (wa, wb1, wb2):
            ws.close()


async def test_a_membership_change_on_one_node_holds_on_every_node(cluster):
    n1, n2, n3 = cluster["nodes"]
    a1, a3 = api(n1), api(n3)
    (ta, alice), (tb, bob), (tc, carol) = [await a1.register() for _ in range(3)]
    a3.tokens.update(a1.tokens)
    group = await a1.conversation(ta, bob, carol)
    assert (await a3.send(ta, group["id"], "warm the node-3 cache"))["seq"] == 1
    assert (await a1.call("POST", f"/api/conversations/{group['id']}/leave", tc))[0] == 204
    await asyncio.sleep(0.3)  # the bus event reaches node 3
    status, _ = await a3.call("POST", "/api/messages", tc, {"conversation_id": group["id"],
                                                            "client_message_id": "after-leaving"})
    assert status == 404


async def test_a_dead_nodes_users_go_offline_and_its_clients_resume_elsewhere(cluster):
    n1, n2, n3 = cluster["nodes"]
    a, (ta, alice), (tb, bob), conv = await friends(n1)
    wa = await Ws.connect(ws_url(n1), ta)
    wb = await Ws.connect(ws_url(n2), tb)
    try:
        await wa.request("sync", {})
        await wb.request("sync", {})
        assert (await a.call("GET", f"/api/presence/{bob['id']}", ta))[1]["presence"]["status"] == "online"
        for n in range(5):
            await a.send(ta, conv["id"], f"before-{n}")
        n2.process.send_signal(signal.SIGKILL)
        n2.process.wait(10)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        while True:  # offline within the lease plus the grace (plus a reaping pass)
            frame = await wa.event("presence", timeout=LEASE * 4 + GRACE + 10)
            if frame["data"]["user_id"] == bob["id"] and frame["data"]["status"] == "offline":
                break
        offline_after = loop.time() - killed
        assert offline_after <= LEASE * 4 + GRACE + 5, offline_after
        assert (await a.call("GET", f"/api/presence/{bob['id']}", ta))[1]["presence"]["status"] == "offline"
        for n in range(5):
            await a.send(ta, conv["id"], f"after-{n}")
        # Bob's app reconnects to another node and catches up: every message once, in order.
        wb = await Ws.connect(ws_url(n3), tb)
        seqs = []
        ack = await wb.request("sync", {"cursors": {conv["id"]: 0}})
        for _ in range(ack["data"]["messages"]):
            seqs.append((await wb.event("message.new"))["data"]["seq"])
        assert seqs == list(range(1, 11))
        live = await a.send(ta, conv["id"], "live")
        assert (await wb.event("message.new"))["data"]["id"] == live["id"]
    finally:
        wa.close()
        wb.close()


async def test_redis_going_away_keeps_requests_working_and_the_bus_comes_back(cluster):
    n1, n2, _ = cluster["nodes"]
    redis = cluster["redis"]
    a, (ta, alice), (tb, bob), conv = await friends(n1)
    wb = await Ws.connect(ws_url(n2), tb)
    try:
        await wb.request("sync", {})
        redis.stop()
        sent = await a.send(ta, conv["id"], "while-redis-is-down")  # stored all the same
        assert sent["seq"] == 1
        deadline = asyncio.get_running_loop().time() + 20
        while (await a.call("GET", "/readyz"))[1]["bus"]["state"] != "degraded":
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
        assert (await a.call("GET", "/readyz"))[0] == 200
        redis.start()  # same port, empty
        restarted = clock()
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            states = [(await api(node).call("GET", "/readyz"))[1]["bus"]["state"] for node in (n1, n2)]
            if states == ["ok", "ok"]:
                break
            assert asyncio.get_running_loop().time() < deadline, states
            await asyncio.sleep(0.2)
        back_after = clock() - restarted
        await asyncio.sleep(LEASE)  # a lease renewal re-announces who is where
        again = await a.send(ta, conv["id"], "after-redis-is-back")
        while True:  # the message sent while Redis was down may not come live: it is there in sync
            frame = (await wb.event("message.new"))["data"]
            if frame["id"] == again["id"]:
                break
        metrics = (await a.call("GET", "/metrics"))[1]
        assert b"kisse_bus_undelivered_events" in metrics
        fresh = await Ws.connect(ws_url(n2), tb)  # a sync has both, once each, in order
        try:
            ack = await fresh.request("sync", {"cursors": {conv["id"]: 0}})
            got = [(await fresh.event("message.new"))["data"]["id"] for _ in range(ack["data"]["messages"])]
        finally:
            fresh.close()
        assert got == [sent["id"], again["id"]]
        print(f"\n[cluster figures] redis restart: bus ok on both nodes {back_after:.2f} s after redis-server "
              f"was back; messages stored 2/2, in sync once each; undelivered while down: "
              f"{(await a.call('GET', '/readyz'))[1]['bus']['undelivered']}")
    finally:
        wb.close()


async def lone_bus() -> tuple[redis_server.RedisServer, RedisBus, Any]:
    """A redis-server of its own, a started RedisBus on it (no Kisse around it), and a
    client to look into Redis with."""
    _needs()
    server = redis_server.RedisServer().start()
    bus = RedisBus(Hub(), dataclasses.replace(TEST_SETTINGS, bus=server.url, bus_lease=LEASE))
    await bus.start()
    return server, bus, redis_client.from_url(server.url)


async def test_a_directory_write_redis_failed_is_made_once_redis_is_back():
    """A user who leaves while Redis is away must not stay in the directory: the
    write is kept and made once Redis answers. (A Redis restarted empty forgets
    the entry anyway; one that kept its data, or stayed up while the node lost
    it, would say the user is still here: the test puts the entry back.)"""
    server, bus, client = await lone_bus()
    try:
        await bus.joined("u1")
        assert await client.smembers("kisse:user:u1") == {bus.node.encode()}
        server.stop()
        await bus.left("u1")  # refused: kept for later
        assert bus.health()["state"] == "degraded"
        server = redis_server.RedisServer(server.port).start()
        await client.aclose()
        client = redis_client.from_url(server.url)  # the old connection died with the server
        await client.sadd("kisse:user:u1", bus.node)
        deadline = asyncio.get_running_loop().time() + LEASE * 4 + 5
        while await client.smembers("kisse:user:u1"):
            assert asyncio.get_running_loop().time() < deadline, "the departure was never written"
            await asyncio.sleep(0.1)
        assert bus.health()["state"] == "ok"
    finally:
        await client.aclose()
        await bus.close()
        server.stop()


async def test_a_node_that_stops_leaves_every_directory_entry_it_had():
    """On stop a node removes itself wherever Redis lists it, also for a user only
    Redis still knows (a departure it lost), and its unsent writes: others must not
    route to a node that is gone and no longer reaped."""
    server, bus, client = await lone_bus()
    try:
        await bus.joined("here")
        await client.sadd("kisse:user:ghost", bus.node)  # a departure this node lost
        await client.sadd(f"kisse:node:{bus.node}:users", "ghost")
        await client.hset("kisse:user:ghost:sessions", mapping={"s-ours": bus.node, "s-other": "another-node"})
        await bus.close()
        for user_id in ("here", "ghost"):
            assert await client.smembers(f"kisse:user:{user_id}") == set(), user_id
        assert await client.hgetall("kisse:user:ghost:sessions") == {b"s-other": b"another-node"}
        assert bus.node.encode() not in await client.smembers("kisse:nodes")
    finally:
        await client.aclose()
        server.stop()


async def test_the_ring_timeout_fires_once_with_three_nodes_sweeping(cluster):
    n1, n2, n3 = cluster["nodes"]
    a, (ta, alice), (tb, bob), conv = await friends(n1)
    wa = await Ws.connect(ws_url(n2), ta)
    wb = await Ws.connect(ws_url(n3), tb)
    try:
        await wa.request("sync", {})
        status, body = await a.call("POST", "/api/calls", ta, {"callee_id": bob["id"], "media": "audio"})
        assert status == 201
        await wb.event("call.incoming")
        states = []
        while not states or states[-1] != "missed":
            frame = (await wa.event("call.state", timeout=20))["data"]
            assert frame["id"] == body["call"]["id"]
            states.append(frame["status"])
        await wa.no_event("call.state", 2.0)  # the timeout fires once, though three nodes sweep
        assert states.count("missed") == 1, states
    finally:
        wa.close()
        wb.close()


async def test_sigterm_on_one_node_moves_its_clients_to_another(cluster):
    n1, n2, n3 = cluster["nodes"]
    a, (ta, alice), (tb, bob), conv = await friends(n1)
    wa = await Ws.connect(ws_url(n1), ta)
    wb = await Ws.connect(ws_url(n2), tb)
    try:
        await wa.request("sync", {})
        await wb.request("sync", {})
        stopping = asyncio.get_running_loop().run_in_executor(None, n2.stop)
        assert await asyncio.wait_for(wb.closed, WAIT) == 1001  # go elsewhere
        assert await stopping == 0
        wb = await Ws.connect(ws_url(n3), tb)
        await wb.request("sync", {})
        sent = await a.send(ta, conv["id"], "after-the-drain")
        assert (await wb.event("message.new"))["data"]["id"] == sent["id"]
        status, seen = await a.call("GET", f"/api/presence/{bob['id']}", ta)
        assert seen["presence"]["status"] == "online"
        await asyncio.sleep(GRACE + LEASE)  # past any grace: moving nodes did not flap
        while not wa.events.empty():
            frame = wa.events.get_nowait()
            assert not (frame["type"] == "presence" and frame["data"]["status"] == "offline"), frame
    finally:
        wa.close()
        wb.close()


async def test_a_node_killed_mid_traffic_loses_and_duplicates_nothing(cluster):
    """Clients on the node that dies resume on another (their load balancer's job,
    here `failover`) and every send is stored once, in order, and acked."""
    n1, n2, n3 = cluster["nodes"]
    a = api(n1)
    pairs, sends_each = 4, 15
    users = [await a.register() for _ in range(2 * pairs)]
    conversations = [(await a.conversation(users[2 * i][0], users[2 * i + 1][1]))["id"] for i in range(pairs)]
    clients = []
    for i, (token, user) in enumerate(users):
        home, others = (n2, [n3, n1]) if i % 2 else (n1, [n3])  # one end of every pair on the node that dies
        clients.append(TrafficClient(home.base, token, user_id=user["id"], conversations=[conversations[i // 2]],
                                     window=5, backoff_base=0.1, backoff_cap=1.0, name=f"c{i}", seed=i,
                                     failover=[o.base for o in others]).start())
    try:
        for client in clients:
            assert await client.wait_for(lambda c=client: c.synced, 30)
        for i, client in enumerate(clients):
            for _ in range(sends_each):
                client.send(conversations[i // 2])
        while sum(1 for c in clients for s in c.sends if s.acked_at) < len(clients) * sends_each // 4:
            await asyncio.sleep(0.005)
        n2.process.send_signal(signal.SIGKILL)
        killed = clock()
        for client in clients:
            assert await client.wait_for(lambda c=client: not c.unacked(), 60), f"{client.name} never got its acks"
        all_acked = clock() - killed
        moved = [c for i, c in enumerate(clients) if i % 2]
        for client in moved:
            assert await client.wait_for(lambda c=client: c.synced and c.syncs[-1] > killed, 30)
        resumed = max(min(t for t in c.syncs if t > killed) for c in moved) - killed

        async def get(path: str, token: str) -> Any:
            status, body = await a.call("GET", path, token)
            assert status == 200, (path, body)
            return body
        counts, problems = await traffic.ledger(get, [users[2 * i][0] for i in range(pairs)], conversations,
                                                clients)
        print(f"\n[cluster figures] kill -9 mid-traffic: sends={len(clients) * sends_each}, "
              f"moved clients={len(moved)}, resumed on another node within {resumed:.2f} s, "
              f"all acked {all_acked:.2f} s after the kill, {counts}")
        wrong = {k: v for k, v in counts.items() if v and k not in ("messages", "tombstones")}
        assert not wrong, (wrong, problems[:10])
        assert counts["messages"] == len(clients) * sends_each
    finally:
        for client in clients:
            await client.stop()


async def test_a_message_on_the_bus_that_is_no_event_is_skipped(cluster):
    import redis.asyncio as aioredis
    n1, n2, _ = cluster["nodes"]
    a, (ta, alice), (tb, bob), conv = await friends(n1)
    node2 = (await api(n2).call("GET", "/readyz"))[1]["bus"]["node"]
    client = aioredis.from_url(cluster["redis"].url)
    try:
        for channel in (f"kisse:to:{node2}", "kisse:everywhere"):
            await client.publish(channel, b"not json")
            await client.publish(channel, b'{"from": "x"}')
    finally:
        await client.aclose()
    wb = await Ws.connect(ws_url(n2), tb)
    try:
        await wb.request("sync", {})
        sent = await a.send(ta, conv["id"], "still-flowing")
        assert (await wb.event("message.new"))["data"]["id"] == sent["id"]
    finally:
        wb.close()
