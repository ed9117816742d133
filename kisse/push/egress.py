"""Connections to public addresses only, for URLs a client chose (Web Push endpoints).

A Web Push endpoint is any https URL a logged-in user registers, and the
server POSTs to it. In production a name that resolves to the server's own
networks (`https://metadata.internal/…`) must not be reached: `PublicOnly`
resolves the name itself, refuses it if any of its addresses is not global,
and connects to an address it checked, so a second lookup (DNS rebinding)
cannot swap in another. TLS still verifies the certificate against the name.
With an HTTPS proxy set, every endpoint goes through the proxy instead
(`NO_PROXY` included: it would open a direct, unchecked path), and the
proxy, which resolves the names, is the egress policy.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.request
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx


class NotPublic(httpcore.ConnectError):
    """The endpoint's host is, or resolves to, an address that is not global."""


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public_address(text: str) -> bool:
    """A global unicast address: not loopback, private, link-local, shared,
    multicast or reserved. An IPv6 address that carries an IPv4 one (mapped,
    IPv4-compatible, NAT64, 6to4) is judged by that; Teredo is refused."""
    address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone says nothing of the address
    if isinstance(address, ipaddress.IPv6Address):
        if address.teredo is not None:
            return False
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.sixtofour is not None:
            address = address.sixtofour
        elif address in NAT64 or int(address) >> 32 == 0:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.is_global and not address.is_multicast


class PublicOnly(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to checked global addresses."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve the endpoint's host: {exc}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in found))
        if not addresses or not all(public_address(a) for a in addresses):
            raise NotPublic("the endpoint's host is not a public address")
        for address in addresses[:-1]:  # each in turn, as a plain connect would (one may be down)
            try:
                return await self._backend.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                       socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue
        return await self._backend.connect_tcp(addresses[-1], port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise NotPublic("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def https_proxy() -> str | None:
    """The HTTPS proxy the environment sets (`HTTPS_PROXY`, `ALL_PROXY`), if any."""
    proxies = urllib.request.getproxies()
    return proxies.get("https") or proxies.get("all")


def public_transport(verify: Any, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go through `PublicOnly`. httpx (pinned in
    requirements.txt) has no public option for the network backend, so its pool is
    made here with the same settings the transport would give it."""
    transport = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=verify, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=PublicOnly())
    return transport
