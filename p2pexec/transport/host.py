"""A py-libp2p host configured the only way p2pexec accepts: TCP, Noise, yamux.

Plaintext and secio are never offered (new_host's defaults would accept
them), and one connection per peer avoids py-libp2p's 250 ms dial delay.
Importing libp2p costs about half a second, so this module is imported only
where a host is really started.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import os

import multiaddr
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from ..errors import ProtocolError
from ..logs import after_libp2p_import

after_libp2p_import()

LEASE_PROTOCOL = TProtocol("/p2pexec/lease/1.0.0")

# py-libp2p's yamux sends a WINDOW_UPDATE frame after every read unless told
# otherwise; go-yamux's half-window hysteresis (what remains) is enough and
# saves a frame, a write and a wake-up per message.  A user's setting wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _interface_ipv4() -> list[str]:
    """Non-loopback first, so a remote peer tries a reachable address before its own loopback."""
    import ifaddr

    ips = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    return sorted(set(ips), key=lambda ip: (ip.startswith("127."), ip))


class Libp2pHost:
    """One host per process; runs inside a trio loop via :meth:`running`."""

    def __init__(self, listen: Sequence[str] = (LOOPBACK,)) -> None:
        key_pair = create_new_key_pair()
        self._listen = [multiaddr.Multiaddr(a) for a in listen]
        self._host = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(key_pair, create_x25519_key_pair().private_key)},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=self._listen,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
        self.peer_id: str = self._host.get_id().to_base58()

    @asynccontextmanager
    async def running(self) -> AsyncIterator["Libp2pHost"]:
        async with self._host.run(self._listen):
            yield self

    @property
    def addrs(self) -> list[str]:
        """Dialable addresses, without the trailing /p2p/ID; 0.0.0.0 becomes each interface's address."""
        suffix = f"/p2p/{self.peer_id}"
        out: list[str] = []
        for addr in self._host.get_addrs():
            text = str(addr).removesuffix(suffix)
            if text.startswith("/ip4/0.0.0.0/"):
                out.extend(text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in _interface_ipv4())
            else:
                out.append(text)
        return out

    def set_handler(self, handler: Callable[[Any], Awaitable[None]]) -> None:
        self._host.set_stream_handler(LEASE_PROTOCOL, handler)

    async def open_stream(self, peer_id: str, addrs: Sequence[str]) -> Any:
        """Dial a peer (if not yet connected) and open a lease stream to it."""
        try:
            pid = ID.from_base58(peer_id)
            maddrs = [multiaddr.Multiaddr(a) for a in addrs]
        except Exception as exc:
            raise ProtocolError(f"peer advertised an unusable address: {exc}") from None
        try:
            await self._host.connect(PeerInfo(pid, maddrs))
            return await self._host.new_stream(pid, [LEASE_PROTOCOL])
        except Exception as exc:
            raise ProtocolError(f"cannot reach peer {peer_id[:16]}… at {list(addrs)}: {exc}") from None
