"""Calls: the server-side state machine, ring timeouts, signalling relay, TURN.

    pending ──accept──▶ accepted ──end──▶ ended
       │ reject ▶ rejected      (either party)
       │ cancel ▶ missed (end_reason "cancelled")
       └ timeout ▶ missed (end_reason "timeout")
    busy: recorded final at once when the callee is already in a live call.

Every transition is a compare-and-set in storage, so when accept, reject,
cancel and the ring timeout race, exactly one wins; the winner tells both
parties the final state with one `call.state` event.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import orjson

from kisse import contacts, protocol
from kisse.errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from kisse.bus import Event
from kisse.runtime import Runtime
from kisse.views import call_view, page_cursor
from storage.base import LIVE_CALL_STATUSES, Record, utcnow

log = logging.getLogger("kisse.calls")
SIGNALS = ("call.offer", "call.answer", "call.ice", "call.hangup")


class CallTimers:
    """Ring timeouts for calls started here, plus a periodic sweep for the rest
    (calls started before a restart or by another process)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def start(self) -> None:
        self.rt.tasks.every(self.rt.settings.call_sweep_interval, self.sweep, "call sweep")

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def schedule(self, call: Record) -> None:
        delay = max((call["ring_deadline"] - utcnow()).total_seconds(), 0)
        self._timers[call["id"]] = asyncio.get_running_loop().call_later(
            delay, lambda: self.rt.tasks.spawn(self._ring_timeout(call["id"]), "ring timeout"))

    def forget(self, call_id: str) -> None:
        timer = self._timers.pop(call_id, None)
        if timer:
            timer.cancel()

    async def _ring_timeout(self, call_id: str) -> None:
        self._timers.pop(call_id, None)
        await miss(self.rt, call_id)

    async def sweep(self) -> int:
        """Mark every overdue ringing call missed; return how many this sweep won."""
        won = 0
        for call in await self.rt.storage.due_pending_calls(utcnow()):
            won += await miss(self.rt, call["id"]) is not None
        return won


def _announce(rt: Runtime, call: Record) -> dict[str, Any]:
    view = call_view(call)
    rt.bus.send([call["caller_id"], call["callee_id"]], "call.state", view)
    if call["status"] not in LIVE_CALL_STATUSES:
        rt.metrics.call_outcomes.labels(call["status"]).inc()
        rt.calls.forget(call["id"])
    return view


async def miss(rt: Runtime, call_id: str) -> dict[str, Any] | None:
    """Ring timeout: pending → missed, if nothing else won first."""
    now = utcnow()
    call = await rt.storage.transition_call(call_id, ("pending",), "missed",
                                            {"ended_at": now, "end_reason": "timeout"})
    return _announce(rt, call) if call else None


async def party_call(rt: Runtime, user_id: str, call_id: str) -> Record:
    """The call if the user is caller or callee; 404 alike for absent and foreign calls."""
    call = await rt.storage.get_call(call_id)
    if call is None or user_id not in (call["caller_id"], call["callee_id"]):
        raise NotFound("no such call", code="call_not_found")
    return call


async def start_call(rt: Runtime, caller_id: str, callee_id: str, media: str,
                     origin_conn: str | None = None) -> dict[str, Any]:
    await rt.limits.hit("calls", caller_id)
    if callee_id not in await rt.storage.contact_ids(caller_id):
        # A stranger, a pending request, a block either way: the same answer, and the
        # callee never rings nor shows busy (kisse/contacts.py).
        callee = None if callee_id == caller_id else await rt.storage.get_user(callee_id)
        if callee is None or callee.get("deleted"):
            raise NotFound("no such user to call", code="user_not_found")
        raise contacts.not_a_contact()
    call = await rt.storage.create_call(caller_id, callee_id, media,
                                        utcnow() + timedelta(seconds=rt.settings.call_ring_timeout))
    view = call_view(call)
    if call["status"] == "busy":
        rt.metrics.call_outcomes.labels("busy").inc()
    if call["status"] == "pending":
        rt.calls.schedule(call)
        rt.bus.send([callee_id], "call.incoming", view)
    rt.bus.send([caller_id], "call.state", view, exclude_conn=origin_conn)
    return view


def _invalid(call: Record | None, action: str) -> Conflict:
    status = call["status"] if call else "unknown"
    return Conflict(f"cannot {action} a call that is {status}", code="invalid_transition",
                    details={"status": status})


async def accept(rt: Runtime, user_id: str, call_id: str, origin_conn: str | None = None) -> dict[str, Any]:
    call = await party_call(rt, user_id, call_id)
    if user_id != call["callee_id"]:
        raise _invalid(call, "accept (only the callee may)")
    # The connection that accepted is stored with the call: signalling goes to that
    # device, whichever process holds it (a REST accept has none: all devices get it).
    won = await rt.storage.transition_call(call_id, ("pending",), "accepted",
                                           {"answered_at": utcnow(), "answered_conn": origin_conn})
    if won is None:
        raise _invalid(await rt.storage.get_call(call_id), "accept")
    view = _announce(rt, won)
    rt.bus.send([user_id], "call.answered_elsewhere", view, exclude_conn=origin_conn)
    return view


async def reject(rt: Runtime, user_id: str, call_id: str) -> dict[str, Any]:
    call = await party_call(rt, user_id, call_id)
    if user_id != call["callee_id"]:
        raise _invalid(call, "reject (only the callee may)")
    return await _finish(rt, call_id, user_id, ("pending",), "rejected", "rejected", "reject")


async def cancel(rt: Runtime, user_id: str, call_id: str) -> dict[str, Any]:
    call = await party_call(rt, user_id, call_id)
    if user_id != call["caller_id"]:
        raise _invalid(call, "cancel (only the caller may)")
    return await _finish(rt, call_id, user_id, ("pending",), "missed", "cancelled", "cancel")


async def end(rt: Runtime, user_id: str, call_id: str) -> dict[str, Any]:
    await party_call(rt, user_id, call_id)
    return await _finish(rt, call_id, user_id, ("accepted",), "ended", "hangup", "end")


async def hang_up(rt: Runtime, user_id: str, call_id: str) -> dict[str, Any]:
    """Whatever fits the call's state: cancel, reject or end (the WS `call.hangup`)."""
    call = await party_call(rt, user_id, call_id)
    if call["status"] == "pending":
        return await (cancel if user_id == call["caller_id"] else reject)(rt, user_id, call_id)
    return await end(rt, user_id, call_id)


async def _finish(rt: Runtime, call_id: str, user_id: str, from_statuses: tuple[str, ...],
                  status: str, reason: str, action: str) -> dict[str, Any]:
    won = await rt.storage.transition_call(call_id, from_statuses, status,
                                           {"ended_at": utcnow(), "end_reason": reason, "ended_by": user_id})
    if won is None:
        raise _invalid(await rt.storage.get_call(call_id), action)
    return _announce(rt, won)


async def relay(rt: Runtime, user_id: str, origin_conn: str, call_id: str, kind: str,
                payload: Any) -> dict[str, Any]:
    """Pass an opaque signalling payload to the other party of a live call."""
    call = await party_call(rt, user_id, call_id)
    if call["status"] not in LIVE_CALL_STATUSES:
        raise _invalid(call, "signal on")
    peer = call["callee_id"] if user_id == call["caller_id"] else call["caller_id"]
    event = {"call_id": call_id, "from_user_id": user_id, "payload": payload}
    try:
        # The event as it will be sent: orjson writes at most 255 levels, and the
        # envelope adds two to the payload's own.
        protocol.encode(kind, event)
        size = len(orjson.dumps(payload))
    except orjson.JSONEncodeError:
        raise BadRequest("payload is nested too deeply", code="invalid_field",
                         details={"field": "payload"}) from None
    if size > rt.settings.max_signal:
        raise PayloadTooLarge(f"signalling payload is over {rt.settings.max_signal} bytes",
                              code="signal_too_large")
    answered_on = call.get("answered_conn") if peer == call["callee_id"] else None
    if answered_on:  # the callee's device that accepted, on whichever process holds it
        delivered = rt.bus.publish(Event(kind, event, (peer,), conn=answered_on))
    else:
        delivered = rt.bus.send([peer], kind, event)
    return {"call_id": call_id, "delivered_to": delivered}


async def active(rt: Runtime, user_id: str) -> dict[str, Any]:
    return {"calls": [call_view(c) for c in await rt.storage.list_active_calls(user_id)]}


async def history(rt: Runtime, user_id: str, limit: int, before: tuple[datetime, str] | None) -> dict[str, Any]:
    calls = await rt.storage.list_call_history(user_id, limit + 1, before)
    page = calls[:limit]
    cursor = page_cursor(page[-1]["created_at"], page[-1]["id"]) if len(calls) > limit else None
    return {"calls": [call_view(c) for c in page], "next_before": cursor}


async def turn_credentials(rt: Runtime, user_id: str) -> dict[str, Any]:
    """coturn REST-API credentials (username `expiry:user_id`, password HMAC-SHA1),
    only for a party to a live call: open sign-up must not open the relay to anyone."""
    settings = rt.settings
    if not settings.turn_secret:
        raise NotFound("TURN is not configured on this server (set KISSE_TURN_SECRET and KISSE_TURN_URIS)",
                       code="turn_not_configured")
    if not await rt.storage.list_active_calls(user_id):
        raise Conflict("TURN credentials are for a party to a ringing or accepted call", code="no_live_call")
    expiry = int(time.time()) + settings.turn_ttl
    username = f"{expiry}:{user_id}"
    digest = hmac.new(settings.turn_secret.encode(), username.encode(), hashlib.sha1).digest()
    return {"username": username, "password": base64.b64encode(digest).decode(),
            "ttl": settings.turn_ttl, "uris": list(settings.turn_uris)}
