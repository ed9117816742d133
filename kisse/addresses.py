"""Who the client is, by address: the socket's peer, or behind trusted proxies
the address they say they forwarded for.

`X-Forwarded-For` is believed only from a peer inside `KISSE_TRUSTED_PROXIES`;
then its entries are read right to left, skipping the trusted proxies, and the
first one that is not a proxy is the client. Anything a client writes to the
left of that is ignored, so a client cannot pick its own address.
"""
from __future__ import annotations

import functools
import ipaddress

from tornado.httputil import HTTPServerRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(request: HTTPServerRequest, trusted_proxies: tuple[str, ...]) -> str:
    """The client's IP address as this server should believe it."""
    peer = request.remote_ip or ""
    networks = _networks(trusted_proxies)
    if not networks or not _trusted(peer, networks):
        return peer
    forwarded = ",".join(request.headers.get_list("X-Forwarded-For"))
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage from a proxy we trust: fall back to the proxy itself
    return hops[0] if hops else peer
