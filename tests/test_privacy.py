"""What a seized database would reveal (issue 21, "Proof"): a scripted session on each
backend, then a dump of everything the backend holds (tests/dump.py: the memory
backend's whole state; every MongoDB collection, GridFS reassembled), searched in
every encoding a server could use for what must not be there.

The session: accounts (one deleted at the end), messages with inline ciphertext
and uploaded content, receipts, a call with signalling, typing, presence, keys in
the directory, a Web Push registration (and a wake-up through it), and
disappearing messages that expire. The clients "encrypt" with
a key the server never sees, so a plaintext found in storage would mean the
server kept something a client gave it in clear (it never is given one: the
search for plaintexts is the sanity floor; passwords, tokens, signalling, private
keys, expired and deleted data are what the server does receive)."""
from __future__ import annotations

import asyncio
import base64
import os
import time
from datetime import datetime, timezone

import pytest

from tests.client import WAIT, Ws
from tests.dump import dump, holds
from tests.fake_webpush import FakeWebPush
from tests.prekeys import DeviceKeys

pytestmark = pytest.mark.gen_test(timeout=90)


class Client:
    """A user's app: its secrets stay here; the server gets ciphertext."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.password = f"{name}-password-{os.urandom(4).hex()}"
        self.key = os.urandom(64)  # the "end-to-end" key of this test's toy cipher
        self.keys = DeviceKeys()
        self.plaintexts: list[bytes] = []

    def encrypt(self, text: str) -> bytes:
        plain = f"{text} [{os.urandom(6).hex()}]".encode()
        self.plaintexts.append(plain)
        stream = (self.key * (len(plain) // len(self.key) + 1))[:len(plain)]
        return bytes(a ^ b for a, b in zip(plain, stream))


async def register(api, client: Client) -> dict:
    status, body = await api.call("POST", "/api/auth/register", body={"username": client.name,
                                                                       "password": client.password})
    assert status == 201, body
    api.tokens[body["user"]["id"]] = body["token"]
    client.session = body
    assert (await api.call("PUT", "/api/keys", body["token"], client.keys.upload()))[0] == 200
    return body


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def upload(api, token: str, message_id: str, data: bytes) -> None:
    status, body = await api.call("POST", f"/api/messages/{message_id}/content", token, raw=data,
                                  headers={"Content-Type": "application/octet-stream"})
    assert status == 201, body


async def test_a_storage_dump_holds_no_secret_no_expired_and_no_deleted_data(api, ws_url, storage, settings):
    alice, bob, dave = Client("alice"), Client("bob"), Client("dave")
    a, b, d = [await register(api, c) for c in (alice, bob, dave)]
    ta, tb, td = a["token"], b["token"], d["token"]
    conversation = await api.conversation(ta, b["user"])
    cid = conversation["id"]
    # Dave's phone sleeps, registered for Web Push (its private key stays on the phone).
    webpush = FakeWebPush()
    await webpush.start()
    subscription = webpush.subscribe()
    assert (await api.call("PUT", "/api/push", td, {"provider": "webpush", **subscription}))[0] == 204
    wa, wb = await Ws.connect(ws_url, ta), await Ws.connect(ws_url, tb)
    for ws in (wa, wb):
        await ws.ok("sync")
    # Messages, inline and uploaded; receipts; typing; presence.
    kept = [await api.send(ta, cid, f"m{n}", b64(alice.encrypt(f"hello bob {n}"))) for n in range(3)]
    attachment = alice.encrypt("a photo of the beach")
    await upload(api, ta, (await api.send(ta, cid, "photo"))["id"], attachment)
    reply = await wb.ok("message.send", {"conversation_id": cid, "client_message_id": "r1",
                                         "ciphertext": b64(bob.encrypt("hi alice"))})
    await wb.ok("message.read", {"message_id": reply["message"]["id"]})
    await wa.ok("typing.start", {"conversation_id": cid})
    await wb.ok("presence.set", {"status": "away"})
    # A call with signalling: relayed, never stored.
    sdp = f"v=0 o=alice-sdp-{os.urandom(6).hex()}"
    call = (await wa.ok("call.start", {"callee_id": b["user"]["id"], "media": "video"}))["call"]
    await wb.ok("call.accept", {"call_id": call["id"]})
    await wa.ok("call.offer", {"call_id": call["id"], "payload": {"sdp": sdp}})
    await wb.ok("call.answer", {"call_id": call["id"], "payload": {"sdp": sdp + " answer"}})
    await wa.ok("call.hangup", {"call_id": call["id"]})
    # Disappearing messages.
    assert (await api.call("PATCH", f"/api/conversations/{cid}", tb, {"message_ttl": 1}))[0] == 200
    fleeting = bob.encrypt("this will self-destruct")
    fleeting_message = await api.send(tb, cid, "gone-1", b64(fleeting))
    fleeting_file = bob.encrypt("a file that expires")
    fleeting_upload = await api.send(tb, cid, "gone-2")
    await upload(api, tb, fleeting_upload["id"], fleeting_file)
    # Dave: messages, content and keys, then he deletes his account.
    with_dave = await api.conversation(td, a["user"])
    daves = dave.encrypt("dave was here")
    daves_file = dave.encrypt("dave's file")
    await api.send(td, with_dave["id"], "d1", b64(daves))
    await api.send(ta, with_dave["id"], "a1", b64(alice.encrypt("hi dave")))
    woken = await webpush.wait_for(subscription, 1, WAIT)  # the phone was woken through its provider
    assert woken[0].json() == {"type": "wake"}
    push_private_key = webpush._sub(subscription).private_key.private_numbers().private_value.to_bytes(32, "big")
    await upload(api, td, (await api.send(td, with_dave["id"], "d2"))["id"], daves_file)
    assert (await api.call("DELETE", "/api/auth/me", td, {"password": dave.password}))[0] == 204
    for ws in (wa, wb):
        ws.close()
    await webpush.stop()

    # Expiry: measured from expires_at to the moment the dump no longer holds them.
    expires_at = max(_timestamp(m["expires_at"]) for m in (fleeting_message, fleeting_upload))
    deadline = time.monotonic() + WAIT
    while True:
        held = b"\x00".join(await dump(storage))
        if not holds(held, fleeting) and not holds(held, fleeting_file):
            gone_after = time.time() - expires_at
            break
        assert time.monotonic() < deadline, "expired ciphertext still stored"
        await asyncio.sleep(0.02)
    print(f"\n[{type(storage).__name__}] expired message and blob gone from storage {gone_after:.2f} s after "
          f"expires_at (sweep every {settings.forget_sweep_interval} s)")

    # The search looks in the right place: what must be there is found.
    assert holds(held, alice.keys.identity_key) and holds(held, bob.keys.identity_key)
    assert holds(held, attachment), "the dump lacks an uploaded blob that is still live"
    assert holds(held, base64.b64decode(kept[0]["ciphertext"]))
    searched: dict[str, list[bytes]] = {
        "plaintexts": [p for c in (alice, bob, dave) for p in c.plaintexts],
        "passwords": [c.password.encode() for c in (alice, bob, dave)],
        "access tokens": [c.session["token"].encode() for c in (alice, bob, dave)],
        "refresh tokens": [c.session["refresh_token"].encode() for c in (alice, bob, dave)],
        "private keys": [c.keys.private_key for c in (alice, bob, dave)] + [push_private_key],
        "the deleted account's push subscription": [subscription["endpoint"].encode(),
                                                    subscription["keys"]["auth"].encode()],
        "end-to-end keys": [c.key for c in (alice, bob, dave)],
        "call signalling": [sdp.encode()],
        "server secrets": [settings.jwt_secret.encode(), settings.turn_secret.encode()],
        "expired ciphertext and content": [fleeting, fleeting_file],
        "deleted account's ciphertext, content and keys": [daves, daves_file, dave.keys.identity_key],
    }
    found = {what: [s[:24] for s in secrets if holds(held, s)] for what, secrets in searched.items()}
    print(f"[{type(storage).__name__}] searched {len(held):,} bytes for: "
          + "; ".join(f"{what} ({len(secrets)})" for what, secrets in searched.items()))
    assert not any(found.values()), {what: hits for what, hits in found.items() if hits}


def _timestamp(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
