"""A circuit-relay v2 service that only members may use, and that tells peers whether they can be reached.

py-libp2p's ``CircuitV2Protocol`` relays for anyone.  :class:`MemberRelay`
serves a peer only after it presented a relay ticket
(:func:`p2pexec.protocol.reach.make_ticket`) on :data:`TICKET_PROTOCOL`
that verifies against the users (board) or members (``p2pexec relay``)
file, and limits each member's reservations and circuits.  The same
exchange answers "how do you see me, and can you reach me?": the relay
dials the peer's listening ports back on fresh TCP connections, at the
address it saw the peer come from, and nowhere else, so it cannot be used
to probe third parties.  (py-libp2p 0.8.1's AutoNAT cannot tell, see
LIBP2P_NOTES.)

Reservations of peers that went away are dropped at once, so short-lived
peers cannot exhaust them.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits

from ..keys import generate_identity_file, load_identity
from ..protocol.reach import InvalidTicket, check_ticket
from .channel import FramedStream, PeerLost
from .host import TICKET_PROTOCOL, Libp2pHost, Notifee

log = logging.getLogger("p2pexec.relay")

DIAL_BACK_TIMEOUT = 2.0
MAX_PORTS = 4
GiB = 1 << 30


@dataclass(frozen=True)
class RelayPolicy:
    """Per-member limits; the defaults carry a 1 GiB task payload both ways with room to spare."""

    reservations_per_member: int = 8
    circuits_per_member: int = 64
    circuit_bytes: int = 16 * GiB      # per circuit, both directions together
    circuit_seconds: int = 24 * 3600   # per circuit


class MemberRelay(CircuitV2Protocol):
    """Circuit relay v2 (hop) for members only; see the module docstring."""

    def __init__(self, host: Any, policy: RelayPolicy, allows: Callable[[str, bytes], bool],
                 on_member: Callable[[ID], None] = lambda peer: None) -> None:
        limits = RelayLimits(duration=policy.circuit_seconds, data=policy.circuit_bytes,
                             max_circuit_conns=policy.circuits_per_member, max_reservations=1 << 20)
        super().__init__(host, limits=limits, allow_hop=True)
        self.policy = policy
        self._allows = allows
        self.members: dict[ID, str] = {}  # peer id -> member it proved to be
        self._circuits: Counter[str] = Counter()  # member -> circuits it opened, live
        self.refused: Counter[str] = Counter()  # reason -> count, for logs and tests
        self._on_member = on_member  # told each peer that presents a valid ticket
        host.set_stream_handler(TICKET_PROTOCOL, self._handle_ticket)

    # -- membership ------------------------------------------------------------------
    async def _handle_ticket(self, stream: Any) -> None:
        framed = FramedStream(stream, max_frame=4096)
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(10):
                raw = await framed.recv()
                if raw is None:
                    return
                request = json.loads(raw)
                user = check_ticket(request["ticket"].encode(), peer=peer.to_base58(),
                                    relay=self.host.get_id().to_base58(), allows=self._allows, now=time.time())
                ports = [p for p in request.get("ports", []) if isinstance(p, int) and 0 < p < 65536][:MAX_PORTS]
                seen = stream.get_remote_address()
                reachable = await self._dial_back(seen[0], ports) if seen and not self._relayed(stream) else []
                self.members[peer] = user
                self._on_member(peer)
                await framed.send(json.dumps({"user": user, "seen": seen[0] if seen else None,
                                              "reachable": reachable}).encode())
                log.info("relay: %s is member %s (seen at %s, reachable ports %s)", peer, user,
                         seen[0] if seen else "?", reachable or "none")
        except (InvalidTicket, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.refused["ticket"] += 1
            log.warning("relay: refused peer %s: %s", peer, exc)
            await framed.send(json.dumps({"error": str(exc)}).encode())
        except (PeerLost, trio.TooSlowError) as exc:
            log.debug("relay: ticket exchange with %s failed: %s", peer, exc)
        finally:
            await framed.close()

    @staticmethod
    def _relayed(stream: Any) -> bool:
        try:
            return any("/p2p-circuit" in str(a) for a in stream.muxed_conn.get_transport_addresses())
        except Exception:
            return False

    @staticmethod
    async def _dial_back(ip: str, ports: list[int]) -> list[int]:
        """Ports of ``ip`` that accept a fresh TCP connection from here."""
        reachable: list[int] = []

        async def probe(port: int) -> None:
            with trio.move_on_after(DIAL_BACK_TIMEOUT):
                try:
                    stream = await trio.open_tcp_stream(ip, port)
                except OSError:
                    return
                await stream.aclose()
                reachable.append(port)

        async with trio.open_nursery() as nursery:
            for port in ports:
                nursery.start_soon(probe, port)
        return sorted(reachable)

    def forget(self, peer: ID) -> None:
        """A peer disconnected: its membership proof and reservation go with it."""
        self.members.pop(peer, None)
        self.resource_manager._reservations.pop(peer, None)  # noqa: SLF001 - 0.8.1 never frees them

    # -- hop -------------------------------------------------------------------------
    async def _handle_hop_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if peer not in self.members:
            self.refused["not-a-member"] += 1
            log.debug("relay: refused hop from %s: no valid ticket", peer)
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "present a p2pexec relay ticket first")
            await self._close_stream(stream)
            return
        await super()._handle_hop_stream(stream)

    async def _handle_reserve(self, stream: Any, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and ID(msg.peer.id) != peer:
            self.refused["reserve-for-other"] += 1
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "reserve only for yourself")
            return
        user = self.members[peer]
        held = sum(1 for p, u in self.members.items()
                   if u == user and p != peer and self.resource_manager.has_reservation(p))
        if held >= self.policy.reservations_per_member:
            self.refused["reservations"] += 1
            log.warning("relay: member %s holds %d reservations already", user, held)
            await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many reservations")
            return
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: Any, msg: HopMessage) -> None:
        user = self.members[stream.muxed_conn.peer_id]
        if self._circuits[user] >= self.policy.circuits_per_member:
            self.refused["circuits"] += 1
            log.warning("relay: member %s has %d circuits open already", user, self._circuits[user])
            await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many circuits")
            await stream.reset()
            return
        self._circuits[user] += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self._circuits[user] -= 1


class _Forget(Notifee):
    """Drop a peer's membership and reservation as soon as its last connection closes."""

    def __init__(self, relay: MemberRelay) -> None:
        self._relay = relay

    async def disconnected(self, network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self._relay.forget(peer)



def relay_seed(path: Path) -> bytes:
    """The relay's key, from an OpenSSH Ed25519 key file made on first use: its peer id, which members may
    have been given by hand (``--relay``), stays the same when the relay restarts."""
    if not path.exists():
        generate_identity_file(path, comment="p2pexec relay key")
    key = load_identity("relay", path).signing_key
    assert key is not None  # (a key file)
    return bytes(key)


@asynccontextmanager
async def running_relay(listen: str, policy: RelayPolicy, allows: Callable[[str, bytes], bool],
                        seed: bytes | None = None) -> AsyncIterator[tuple[Libp2pHost, MemberRelay]]:
    """A relay host on ``listen`` (a multiaddr) serving members only, while the block runs; its key is made
    from ``seed`` (:func:`relay_seed`), else fresh."""
    from libp2p.tools.anyio_service import background_trio_service

    host = Libp2pHost([listen], members_only=True, seed=seed)  # a peer has PROVE_SECONDS to present its ticket
    async with host.running():
        relay = MemberRelay(host.host, policy, allows, on_member=host.proved)
        host.host.get_network().register_notifee(_Forget(relay))
        async with background_trio_service(relay):
            yield host, relay


class RelayService:
    """A member relay on its own trio thread, beside the threaded board or alone (``p2pexec relay``)."""

    def __init__(self, listen: str, policy: RelayPolicy, allows: Callable[[str, bytes], bool],
                 seed: bytes | None = None) -> None:
        from ..runtime import TrioThread

        self._args = (listen, policy, allows, seed)
        self._stop: trio.Event | None = None
        self.peer_id = ""
        self.addrs: list[str] = []
        self.relay: MemberRelay | None = None
        self._thread = TrioThread(self._main, name="p2pexec-relay")

    async def _main(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with running_relay(*self._args) as (host, relay):
            self.peer_id, self.addrs, self.relay = host.peer_id, host.addrs, relay
            self._stop = trio.Event()
            task_status.started()
            await self._stop.wait()

    @property
    def port(self) -> int:
        return int(self.addrs[0].split("/")[4])

    def stop(self) -> None:
        if self._stop is not None and self._thread.alive:
            self._thread.call_soon(self._stop.set)
        self._thread.join(5)
