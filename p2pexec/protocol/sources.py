"""Where a connection comes from, as limits count it: one IPv4 address, or one IPv6 /64.

An IPv6 user usually has a whole /64 to pick addresses from, so counting
single IPv6 addresses would let one attacker look like millions.  Shared by
the board's admission and the libp2p port's.
"""

from __future__ import annotations

import ipaddress


def source_of(host: str) -> str:
    """The source ``host`` counts against (IPv4-mapped IPv6 counts as IPv4); ValueError if it is no IP address."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])  # (a zone index says nothing about the sender)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)
