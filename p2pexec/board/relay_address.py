"""The relay that comes with a board, as its members are told it (the ``relay`` command).

A board started with a relay (``p2pexec board``) tells members where to reach
it: at the address they reached the board on, so a board behind port
forwarding or on a host with several addresses answers each member with one
that member can dial, unless fixed addresses are announced instead.  Pure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class RelayAddress:
    """The relay that comes with this board: its libp2p peer id and TCP port, or fixed addresses."""

    peer_id: str
    port: int
    announce: tuple[str, ...] = ()  # full multiaddrs to tell instead (port forwarding, another host)


def relay_info(relay: RelayAddress | None, here: str, there: str) -> str:
    """The ``relay`` command's answer (a JSON line) to a member that reached the board's address ``here``
    from ``there``: the relay's multiaddrs (none without a relay), and the member's address as seen."""
    addrs = list(relay.announce) if relay else []
    if relay and not addrs:
        proto = "ip6" if ":" in here else "ip4"
        addrs = [f"/{proto}/{here}/tcp/{relay.port}/p2p/{relay.peer_id}"]
    return json.dumps({"relays": addrs, "seen": there}) + "\n"
