"""The one heartbeat timer of a process (kisse/heartbeat.py): each connection is
beaten once per interval, spread over slots, and a visit the loop delayed by half
an interval or more gives no verdict. Short intervals; generous bounds."""
from __future__ import annotations

import asyncio
import time

import pytest

from kisse.heartbeat import SLOTS, Heartbeat

pytestmark = pytest.mark.gen_test(timeout=30)
INTERVAL = 0.4


class Peer:
    def __init__(self) -> None:
        self.beats: list[tuple[float, bool]] = []

    def beat(self, late: bool) -> None:
        self.beats.append((asyncio.get_running_loop().time(), late))


class Broken(Peer):
    def beat(self, late: bool) -> None:
        raise RuntimeError("a bug in one connection")


async def test_each_connection_is_beaten_once_per_interval_in_its_own_slot():
    heartbeat = Heartbeat(INTERVAL)
    peers = [Peer() for _ in range(SLOTS * 2)]
    broken = Broken()
    slots = [heartbeat.add(p) for p in peers]
    heartbeat.add(broken)  # in slot 0, with peers[0] and peers[8]
    gone = peers[1]
    heartbeat.discard(gone, slots[1])
    runner = asyncio.ensure_future(heartbeat.run())
    try:
        await asyncio.sleep(INTERVAL * 5.5)
    finally:
        runner.cancel()
    assert slots == [n % SLOTS for n in range(SLOTS * 2)]
    assert gone.beats == []
    for n, peer in enumerate(peers):
        if peer is gone:
            continue
        assert 3 <= len(peer.beats) <= 6, (n, len(peer.beats))  # 5 intervals; a slow machine beats fewer
        gaps = [b[0] - a[0] for a, b in zip(peer.beats, peer.beats[1:])]
        assert all(gap > INTERVAL * 0.5 for gap in gaps), gaps
    # Slots take turns: the two peers of one slot are beaten in the same visit, the next
    # slot's a step later.
    first = {n: peers[n].beats[0][0] for n in (0, 8, 2)}
    assert abs(first[0] - first[8]) < INTERVAL / SLOTS / 2 < abs(first[0] - first[2])


async def test_a_visit_the_loop_delayed_gives_no_verdict():
    heartbeat = Heartbeat(INTERVAL)
    peers = [Peer() for _ in range(SLOTS)]
    for peer in peers:
        heartbeat.add(peer)
    runner = asyncio.ensure_future(heartbeat.run())
    try:
        await asyncio.sleep(INTERVAL * 1.5)
        time.sleep(INTERVAL * 0.8)  # the loop is blocked: visits due meanwhile wake late
        stalled_until = asyncio.get_running_loop().time()
        await asyncio.sleep(INTERVAL * 1.5)
    finally:
        runner.cancel()
    after = [late for peer in peers for at, late in peer.beats if at >= stalled_until]
    assert True in after  # the visits the stall delayed judged nobody
    assert all(any(at >= stalled_until for at, _ in peer.beats) for peer in peers)  # and every slot came again
