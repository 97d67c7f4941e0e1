"""Client addresses as per-address limits count them.

The gateway's rate limit for anonymous requests and its connection cap, and
auth's login throttle, count an IPv4 address on its own and an IPv6 address
by its /64. A /64 is one subscriber's network, in which a host may take any of
2^64 addresses (and privacy extensions rotate them anyway): counted one by
one, IPv6 addresses would give one client a fresh bucket for every request.
An IPv4-mapped IPv6 address counts as its IPv4 address; anything that is not
an IP address (a Unix socket's peer, "unknown") counts as it is.
"""

from __future__ import annotations

import functools
import ipaddress

IPV6_PREFIX = 64
"""The IPv6 prefix one client is counted by (one subscriber's network)."""


def limit_key(address: str) -> str:
    """The part of `address` a per-address limit counts (see the module)."""
    if ":" not in address:  # IPv4, or not an address: as it is, without parsing
        return address
    return _ipv6_key(address)


@functools.lru_cache(maxsize=4096)
def _ipv6_key(address: str) -> str:
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
