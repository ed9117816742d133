"""Signal-protocol key material for tests, as libsignal serializes and signs it:
Curve25519 keys with their 0x05 type byte, Kyber-1024 public keys with 0x08,
XEdDSA signatures carrying the Edwards sign bit in their top bit.

The server cannot tell a Kyber key from 1,568 random bytes (it checks sizes,
type bytes and signatures), so the PQ keys here are random. The libsignal proof
(examples/signal, tests/test_signal.py) uses real ones.
"""
from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from typing import Any

import xeddsa


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def curve_key() -> bytes:
    return b"\x05" + xeddsa.priv_to_curve25519_pub(xeddsa.seed_to_priv(os.urandom(32)))


def kyber_key() -> bytes:
    return b"\x08" + os.urandom(1568)


class DeviceKeys:
    """One device's identity key pair; makes its uploads."""

    def __init__(self, registration_id: int = 1234) -> None:
        self.private_key = xeddsa.seed_to_priv(os.urandom(32))
        self.identity_key = b"\x05" + xeddsa.priv_to_curve25519_pub(self.private_key)
        self.registration_id = registration_id

    def sign(self, message: bytes) -> bytes:
        signature = bytearray(xeddsa.ed25519_priv_sign(self.private_key, message, os.urandom(64)))
        signature[63] = (signature[63] & 0x7F) | (xeddsa.priv_to_ed25519_pub(self.private_key)[31] & 0x80)
        return bytes(signature)

    def signed(self, key_id: int, public_key: bytes) -> dict[str, Any]:
        return {"key_id": key_id, "public_key": b64(public_key), "signature": b64(self.sign(public_key))}

    def one_time(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        return [{"key_id": i, "public_key": b64(curve_key())} for i in ids]

    def pq_one_time(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        return [self.signed(i, kyber_key()) for i in ids]

    def upload(self, one_time: Iterable[int] = range(1, 6), pq: Iterable[int] = range(101, 106),
               signed_id: int = 1, last_resort_id: int = 1000) -> dict[str, Any]:
        """A `PUT /api/keys` body."""
        return {"registration_id": self.registration_id, "identity_key": b64(self.identity_key),
                "signed_prekey": self.signed(signed_id, curve_key()),
                "pq_last_resort_prekey": self.signed(last_resort_id, kyber_key()),
                "one_time_prekeys": self.one_time(one_time), "pq_one_time_prekeys": self.pq_one_time(pq)}
