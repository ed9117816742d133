"""The key directory of the Signal protocol (PQXDH): public keys only, per device.

Each device uploads its registration id, identity key, signed EC prekey and
signed last-resort Kyber prekey, plus pools of one-time EC and Kyber prekeys.
Whoever may write to a user claims a bundle per device, and each one-time key
is handed out once, ever. The server checks what it can about what it stores
(sizes, libsignal's type bytes, every signature against the device's identity
key) and never sees a private key.

Who may claim: the user themselves (for their other devices) and anyone who
shares a conversation with them and is not blocked either way. Someone the
target has not accepted yet (a message request) gets the last-resort keys
only, so a stranger can open a session but never drain the one-time pools;
anyone else gets the 404 an unknown user gets.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
from typing import TYPE_CHECKING, Any

import xeddsa

from kisse.bus import Event
from kisse.errors import BadRequest, Conflict, NotFound, Unauthorized
from kisse.runtime import Runtime
from storage.base import PrekeyIdTaken, Record, TooManyPrekeys

if TYPE_CHECKING:  # kisse.sessions tells this module of revoked devices
    from kisse.sessions import Identity

# libsignal's serialized public keys start with a type byte.
CURVE_KEY = (0x05, 33)    # Curve25519
KYBER_KEY = (0x08, 1569)  # Kyber-1024
SIGNATURE_SIZE = 64
KINDS = {"one_time_prekeys": "ec", "pq_one_time_prekeys": "pq"}


def _bytes(value: str, field: str, key: tuple[int, int] | None = None) -> bytes:
    """Standard base64 → bytes of the size (and libsignal type byte) `field` must have."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not standard base64", code="invalid_key", details={"field": field}) from None
    type_byte, size = key or (None, SIGNATURE_SIZE)
    if len(raw) != size or (type_byte is not None and raw[0] != type_byte):
        what = f"{size} bytes" + (f" starting with type byte {type_byte:#04x}" if type_byte is not None else "")
        raise BadRequest(f"{field}: must be {what}", code="invalid_key", details={"field": field})
    return raw


def _prekey(prekey: dict[str, Any], field: str, key: tuple[int, int], signed: bool) -> Record:
    record: Record = {"key_id": prekey["key_id"], "public_key": _bytes(prekey["public_key"], f"{field}.public_key", key)}
    if signed:
        record["signature"] = _bytes(prekey["signature"], f"{field}.signature")
    return record


def _pool(body: dict[str, Any], name: str) -> list[Record]:
    """One list of one-time prekeys of the body, decoded; a key id twice is refused."""
    key, signed = (CURVE_KEY, False) if KINDS[name] == "ec" else (KYBER_KEY, True)
    keys = [_prekey(p, f"{name}.{i}", key, signed) for i, p in enumerate(body.get(name) or ())]
    if len({k["key_id"] for k in keys}) != len(keys):
        raise BadRequest(f"{name}: a key id appears twice", code="duplicate_key_id", details={"field": name})
    return keys


def verify(identity_key: bytes, message: bytes, signature: bytes) -> bool:
    """libsignal's XEdDSA check: the identity key is Montgomery; the Edwards key's
    sign bit travels in the signature's top bit."""
    signature = bytearray(signature)
    sign_bit = bool(signature[63] & 0x80)
    signature[63] &= 0x7F
    try:
        edwards = xeddsa.curve25519_pub_to_ed25519_pub(identity_key[1:], sign_bit)
        return bool(xeddsa.ed25519_verify(bytes(signature), edwards, message))
    except (xeddsa.XEdDSAException, ValueError):
        return False


async def _check_signatures(identity_key: bytes, signed: list[tuple[str, Record]]) -> None:
    """400 `invalid_signature` naming the first prekey its signature does not fit."""
    def first_bad() -> str | None:  # in a worker thread: 100 PQ keys take milliseconds
        return next((field for field, key in signed
                     if not verify(identity_key, key["public_key"], key["signature"])), None)
    bad = await asyncio.get_running_loop().run_in_executor(None, first_bad) if signed else None
    if bad is not None:
        raise BadRequest(f"{bad}: the signature is not the identity key's over the public key",
                         code="invalid_signature", details={"field": bad})


def _counts(counts: dict[str, int] | None) -> dict[str, int]:
    counts = counts or {"ec": 0, "pq": 0}
    return {"one_time_prekeys": counts["ec"], "pq_one_time_prekeys": counts["pq"]}


FIELDS = {kind: name for name, kind in KINDS.items()}


async def _add(rt: Runtime, me: Identity, pools: dict[str, list[Record]]) -> None:
    """Both pools' new keys, all or none."""
    by_kind = {KINDS[name]: keys for name, keys in pools.items() if keys}
    if not by_kind:
        return
    try:
        live = await rt.storage.add_prekeys(me.session_id, by_kind, rt.settings.prekey_max)
    except PrekeyIdTaken as taken:
        name = FIELDS[taken.args[0]]
        raise BadRequest(f"{name}: a key id is in this device's pool already, with another key",
                         code="duplicate_key_id", details={"field": name}) from None
    except TooManyPrekeys as full:
        raise _too_many(rt, FIELDS[full.args[0]]) from None
    if not live:
        raise Unauthorized("this device was signed out: log in again", code="session_revoked")


def _too_many(rt: Runtime, name: str) -> Conflict:
    return Conflict(f"{name}: a device holds at most {rt.settings.prekey_max} one-time prekeys of a kind",
                    code="too_many_prekeys", details={"field": name, "max": rt.settings.prekey_max})


async def _bundle_of(rt: Runtime, me: Identity) -> Record | None:
    return next((b for b in await rt.storage.key_bundles(me.user_id) if b["session_id"] == me.session_id), None)


async def upload(rt: Runtime, me: Identity, body: dict[str, Any]) -> dict[str, int]:
    """`PUT /api/keys`: set the calling device's bundle and add one-time prekeys; a
    refused request changes nothing."""
    identity_key = _bytes(body["identity_key"], "identity_key", CURVE_KEY)
    bundle = {"registration_id": body["registration_id"], "identity_key": identity_key,
              "signed_prekey": _prekey(body["signed_prekey"], "signed_prekey", CURVE_KEY, True),
              "pq_last_resort_prekey": _prekey(body["pq_last_resort_prekey"], "pq_last_resort_prekey",
                                               KYBER_KEY, True)}
    pools = {name: _pool(body, name) for name in KINDS}
    for name, keys in pools.items():
        if len(keys) > rt.settings.prekey_max:
            raise _too_many(rt, name)
    await _check_signatures(identity_key, [("signed_prekey", bundle["signed_prekey"]),
                                           ("pq_last_resort_prekey", bundle["pq_last_resort_prekey"]),
                                           *((f"pq_one_time_prekeys.{i}", k)
                                             for i, k in enumerate(pools["pq_one_time_prekeys"]))])
    mine = await _bundle_of(rt, me)
    # The pools first, so that a refused key leaves the bundle as it was; but a new
    # identity empties the pools (set_key_bundle), and then they are filled again.
    reinstalled = mine is not None and mine["identity_key"] != identity_key
    if not reinstalled:
        await _add(rt, me, pools)
    live, previous = await rt.storage.set_key_bundle(me.session_id, bundle)
    if not live:
        raise Unauthorized("this device was signed out: log in again", code="session_revoked")
    if reinstalled:
        await _add(rt, me, pools)
    if previous is None:
        await _tell_contacts(rt, me.user_id, "device.added", {"user_id": me.user_id, "device_id": me.device_id})
    elif previous != identity_key:
        await _tell_contacts(rt, me.user_id, "identity.changed", {"user_id": me.user_id, "device_id": me.device_id})
    return _counts(await rt.storage.count_prekeys(me.session_id))


async def add_prekeys(rt: Runtime, me: Identity, body: dict[str, Any]) -> dict[str, int]:
    """`POST /api/keys/prekeys`: more one-time prekeys for the calling device."""
    pools = {name: _pool(body, name) for name in KINDS}
    mine = await _bundle_of(rt, me)
    if mine is None:
        raise Conflict("upload this device's keys with PUT /api/keys first", code="keys_not_uploaded")
    await _check_signatures(mine["identity_key"], [(f"pq_one_time_prekeys.{i}", k)
                                                   for i, k in enumerate(pools["pq_one_time_prekeys"])])
    await _add(rt, me, pools)
    return _counts(await rt.storage.count_prekeys(me.session_id))


async def counts(rt: Runtime, me: Identity) -> dict[str, int]:
    """`GET /api/keys`: the calling device's one-time prekeys left."""
    return _counts(await rt.storage.count_prekeys(me.session_id))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _prekey_view(key: Record) -> dict[str, Any]:
    view = {"key_id": key["key_id"], "public_key": _b64(key["public_key"])}
    if "signature" in key:
        view["signature"] = _b64(key["signature"])
    return view


async def _may_claim(rt: Runtime, claimer_id: str, user_id: str) -> bool:
    """Whether the claimer gets one-time keys (True), the last-resort ones only (False),
    or the 404 of an unknown user (NotFound)."""
    unknown = NotFound("no such user", code="user_not_found")
    if claimer_id == user_id:
        return True
    user = await rt.storage.get_user(user_id)
    if user is None or user.get("deleted") or user_id in await rt.blocks.either_way(claimer_id):
        raise unknown
    if await rt.storage.shares_conversation(claimer_id, user_id, accepted_by=user_id):
        return True
    if await rt.storage.shares_conversation(claimer_id, user_id):
        return False  # a message request they have not accepted: no draining their pools
    raise unknown


async def claim(rt: Runtime, me: Identity, user_id: str, device_id: int | None = None) -> dict[str, Any]:
    """`GET /api/keys/{user_id}[/{device_id}]`: a bundle per live device, each one-time
    key taken from its pool for good; the last-resort PQ key when the pool is empty."""
    await rt.limits.spend(("claims", (me.user_id,)), ("claims_pair", (me.user_id, user_id)))
    one_time = await _may_claim(rt, me.user_id, user_id)
    bundles = [b for b in await rt.storage.key_bundles(user_id)
               if b["session_id"] != me.session_id and (device_id is None or b["device_id"] == device_id)]
    if device_id is not None and not bundles:
        raise NotFound("no such device in the key directory", code="device_not_found")
    devices = []
    for bundle in bundles:
        session_id = bundle["session_id"]
        ec = await rt.storage.take_prekey(session_id, "ec") if one_time else None
        pq = await rt.storage.take_prekey(session_id, "pq") if one_time else None
        devices.append({"device_id": bundle["device_id"], "registration_id": bundle["registration_id"],
                        "identity_key": _b64(bundle["identity_key"]),
                        "signed_prekey": _prekey_view(bundle["signed_prekey"]),
                        "pq_prekey": _prekey_view(pq or bundle["pq_last_resort_prekey"]),
                        "one_time_prekey": _prekey_view(ec) if ec else None})
        if one_time:
            await tell_if_low(rt, user_id, session_id)
    return {"user_id": user_id, "devices": devices}


async def tell_if_low(rt: Runtime, user_id: str, session_id: str, conn_id: str | None = None) -> None:
    """`keys.low` to the device (or to one of its connections) when a pool runs low."""
    left = await rt.storage.count_prekeys(session_id)
    if left is None or min(left.values()) >= rt.settings.prekey_low:
        return
    data = {**_counts(left), "threshold": rt.settings.prekey_low}
    if conn_id is None:
        rt.bus.send_device(user_id, session_id, "keys.low", data)
    else:
        rt.bus.publish(Event("keys.low", data, (user_id,), conn=conn_id))


async def device_removed(rt: Runtime, user_id: str, device_ids: list[int]) -> None:
    """Senders drop these devices before they encrypt again."""
    for device_id in device_ids:
        await _tell_contacts(rt, user_id, "device.removed", {"user_id": user_id, "device_id": device_id})


async def _tell_contacts(rt: Runtime, user_id: str, event_type: str, data: dict[str, Any]) -> None:
    """An event for the user's contacts and the user's own devices."""
    rt.bus.send([user_id, *await rt.storage.contact_ids(user_id)], event_type, data)
