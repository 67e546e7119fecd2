"""A py-libp2p host as p2pexec uses it: listening, dialing, relays, hole punching.

The host speaks TCP, Noise and yamux only, built and patched by
:mod:`p2pexec.transport.libp2p_config`; every TCP connection accepted on our
listening ports passes the gate of :mod:`p2pexec.transport.gate` first
(with ``members_only``, a peer must prove membership, :meth:`Libp2pHost.proved`).
Importing libp2p costs about half a second, so this module is imported only
where a host is really started.

With ``nat_traversal`` the host can also hold a reservation on a member
relay (so peers behind NATs reach it through a circuit), accept relayed
connections, and upgrade them to direct ones by DCUtR hole punching.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator

import multiaddr
import trio
from multiaddr.protocols import P_P2P
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, DCUtRProtocol, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.tools.anyio_service import background_trio_service

from ..errors import ProtocolError
from ..keys import Identity
from ..protocol.matching import REVISION
from ..protocol.reach import CIRCUIT, direct_and_relayed, make_ticket, split_tcp
from .admission import Admission, Limits
from .channel import FramedStream
from .gate import PROVE_SECONDS, Gate, GatedTCP
from .libp2p_config import DIAL_TIMEOUT, Notifee, new_libp2p_host

LEASE_PROTOCOL = TProtocol(f"/p2pexec/lease/{REVISION}.0.0")  # (sides of other revisions never lease)
TICKET_PROTOCOL = TProtocol("/p2pexec/relay-ticket/1.0.0")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ALL_INTERFACES = "/ip4/0.0.0.0/tcp/0"
DIRECT_HEAD_START = 0.3   # a relayed dial starts this long after the direct one, or when it fails
RELAY_JOIN_TIMEOUT = 10.0
_CLIENT_LIMITS = RelayLimits(duration=0, data=0, max_circuit_conns=64, max_reservations=4)


class Unreachable(ProtocolError):
    """No address of a peer worked; ``attempts`` says what was tried and why each failed."""

    def __init__(self, peer: str, attempts: dict[str, str]) -> None:
        tried = "; ".join(f"{a}: {why}" for a, why in attempts.items()) or "no usable address was announced"
        super().__init__(f"cannot reach peer {peer[:16]}…: {tried}")
        self.attempts = attempts


class RelayRefused(ProtocolError):
    """A relay did not take us as a member, or refused a reservation."""


@dataclass(frozen=True)
class RelayJoin:
    """What a relay told us: who we are to it, where it saw us, what it could dial back."""

    relay: str            # its address, /ip4/.../tcp/.../p2p/ID
    seen: str | None      # our IP as the relay saw it
    reachable: tuple[int, ...]  # our listening ports it reached on a fresh connection
    circuit: str | None   # our circuit address through it, if we reserved


def _interface_ipv4() -> list[str]:
    import ifaddr

    return sorted({ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)})


def _short(exc: BaseException) -> str:
    """One line on why: py-libp2p's own message, then its cause's (which says what actually failed)."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text += f": {str(cause) or type(cause).__name__}"
    return text if len(text) < 240 else text[:237] + "..."


def _refuse_ports_in_use(listen: Sequence[multiaddr.Multiaddr]) -> None:
    """OSError (EADDRINUSE) for a fixed TCP port that something listens on already.

    py-libp2p listens with SO_REUSEPORT (hole punching dials from the
    listening port), so a second relay on a port in use started without a
    word and the kernel split the connections between the two: half of its
    members reached another process's peer id.  A plain bind finds out
    (SO_REUSEADDR only lets it past connections of an earlier run that wait
    to close).
    """
    for addr in listen:
        tcp = split_tcp(str(addr))
        if tcp is None:  # port 0, or not TCP
            continue
        with socket.socket(socket.AF_INET6 if ":" in tcp[0] else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(tcp)


class Libp2pHost:
    """One host per process; runs inside a trio loop via :meth:`running`."""

    def __init__(self, listen: Sequence[str] = (LOOPBACK,), *, nat_traversal: bool = False,
                 members_only: bool = False, limits: Limits | None = None, seed: bytes | None = None) -> None:
        """``members_only``: close a TCP connection accepted from a peer that has not proved membership
        (:meth:`proved`) within ``limits.prove_seconds`` (default :data:`PROVE_SECONDS`) of its handshake.
        ``seed``: the host's key, where its peer id must outlive the process (a relay)."""
        self._listen = [multiaddr.Multiaddr(a) for a in listen]
        _refuse_ports_in_use(self._listen)
        if limits is None:
            limits = Limits(prove_seconds=PROVE_SECONDS if members_only else None)
        self._gate = Gate(Admission(limits))
        self._host = new_libp2p_host(self._listen, GatedTCP(self._gate), per_peer=4 if nat_traversal else 1,
                                     seed=seed)
        self.peer_id: str = self._host.get_id().to_base58()
        self.nat_traversal = nat_traversal
        self._circuits: CircuitV2Transport | None = None
        self._dcutr: DCUtRProtocol | None = None
        self._dial_locks: dict[str, trio.Lock] = {}
        self._new_connection: dict[str, trio.Event] = {}  # peer id -> set when a connection to it opens
        self._host.get_network().register_notifee(_Connected(self._new_connection))
        self._host.get_network().register_notifee(self._gate)
        self._nursery: trio.Nursery | None = None

    def proved(self, peer: Any) -> None:
        """``peer`` (a libp2p ID) proved membership: its connections are no longer a stranger's."""
        self._gate.proved(peer)

    @property
    def admission(self) -> Admission:
        """What the gate counts (refusals, drops), for logs and tests."""
        return self._gate.admission

    @property
    def host(self) -> Any:
        """The py-libp2p host itself, for services that need it (the relay)."""
        return self._host

    @asynccontextmanager
    async def running(self) -> AsyncIterator["Libp2pHost"]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._host.run(self._listen))
            if self.nat_traversal:
                stop = CircuitV2Protocol(self._host, _CLIENT_LIMITS, allow_hop=False)  # accepts relayed connections
                self._circuits = CircuitV2Transport(self._host, stop, RelayConfig(
                    roles=RelayRole.STOP | RelayRole.CLIENT, limits=_CLIENT_LIMITS))
                await stack.enter_async_context(background_trio_service(stop))
                self._dcutr = DCUtRProtocol(self._host)
                await stack.enter_async_context(background_trio_service(self._dcutr))
            stack.push_async_callback(self._hang_up)
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            yield self
            self._nursery.cancel_scope.cancel()

    async def _hang_up(self) -> None:
        """Close our connections on the way out, so peers (a relay holding our reservation) know at once.

        py-libp2p's ``run()`` leaves them open when the loop outlives the host.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                for conns in list(self._host.get_network().connections.values()):
                    for conn in list(conns):
                        nursery.start_soon(_close_connection, conn)

    # -- addresses -------------------------------------------------------------------
    @property
    def addrs(self) -> list[str]:
        """Our direct addresses, without /p2p/ID; 0.0.0.0 becomes each interface's address."""
        suffix = f"/p2p/{self.peer_id}"
        out: list[str] = []
        for addr in self._host.get_addrs():
            text = str(addr).removesuffix(suffix)
            if CIRCUIT in text:
                continue
            if text.startswith("/ip4/0.0.0.0/"):
                out.extend(text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in _interface_ipv4())
            else:
                out.append(text)
        return out

    @property
    def listen_ports(self) -> list[int]:
        return sorted({tcp[1] for a in self.addrs if (tcp := split_tcp(a)) is not None})

    def set_handler(self, handler: Callable[[Any], Awaitable[None]]) -> None:
        self._host.set_stream_handler(LEASE_PROTOCOL, handler)

    # -- relays ----------------------------------------------------------------------
    async def join_relay(self, relay: str, identity: Identity, *, reserve: Callable[[RelayJoin], bool],
                         check_ports: bool = True) -> RelayJoin:
        """Prove membership to a relay, learn how it sees us, and reserve a circuit if ``reserve`` says so.

        With ``check_ports`` the relay also dials our listening ports back
        (up to 2 s when they are not reachable): only peers that serve need it.

        Raises :class:`RelayRefused` or :class:`Unreachable`.
        """
        try:
            maddr = multiaddr.Multiaddr(relay)
            relay_id = ID.from_base58(maddr.get_peer_id() or "")
        except Exception as exc:
            raise RelayRefused(f"relay address {relay!r} is not a /ip4/.../tcp/.../p2p/ID multiaddr: {exc}") from None
        with trio.fail_after(RELAY_JOIN_TIMEOUT):
            try:
                if not self.connected(relay_id.to_base58()):  # (host.connect would wait 250 ms for nothing)
                    await self._host.get_network().dial_addr(maddr.decapsulate_code(P_P2P), relay_id)
                stream = await self._host.new_stream(relay_id, [TICKET_PROTOCOL])
            except Exception as exc:
                raise Unreachable(relay_id.to_base58(), {relay: _short(exc)}) from None
            framed = FramedStream(stream, max_frame=4096)
            ticket = make_ticket(identity, self.peer_id, relay_id.to_base58(), time.time())
            ports = self.listen_ports if check_ports else []
            await framed.send(json.dumps({"ticket": ticket.decode(), "ports": ports}).encode())
            raw = await framed.recv()
            await framed.close()
            try:
                answer = json.loads(raw or b"{}")
            except ValueError:
                answer = {"error": "garbled answer"}
            if "error" in answer or not isinstance(answer.get("reachable"), list):
                raise RelayRefused(f"relay {relay} refused us: {answer.get('error', 'no answer')}")
            seen = answer.get("seen") if isinstance(answer.get("seen"), str) else None
            join = RelayJoin(relay, seen, tuple(p for p in answer["reachable"] if isinstance(p, int)), None)
            if not (self._circuits and self._nursery and reserve(join)):
                return join
            hop = await self._host.new_stream(relay_id, [HOP_PROTOCOL])
            if not await self._circuits.reserve(hop, relay_id, self._nursery):
                raise RelayRefused(f"relay {relay} refused a reservation (limit reached?)")
            return RelayJoin(relay, seen, join.reachable, f"{relay}{CIRCUIT}")

    # -- dialing ---------------------------------------------------------------------
    async def open_stream(self, peer_id: str, addrs: Sequence[str],
                          head_start: float = DIRECT_HEAD_START) -> Any:
        """Reach a peer by any address that works and open a lease stream to it.

        Direct addresses are dialled first; relay circuits ``head_start``
        seconds later, or as soon as every direct address failed.  The
        first connection wins.  Raises :class:`Unreachable` naming each
        address tried and why it failed.
        """
        direct_addrs, circuits = direct_and_relayed(addrs)
        try:
            pid = ID.from_base58(peer_id)
            direct = [multiaddr.Multiaddr(a) for a in direct_addrs]
            relayed = [multiaddr.Multiaddr(f"{a}/p2p/{peer_id}") for a in circuits]
        except Exception as exc:
            raise ProtocolError(f"peer advertised an unusable address: {exc}") from None
        async with self._dial_locks.setdefault(peer_id, trio.Lock()):  # one dial per peer: one circuit, not two
            if not self.connected(peer_id):
                await self._connect(pid, direct, relayed, head_start)
        try:
            return await self._host.new_stream(pid, [LEASE_PROTOCOL])
        except Exception as exc:
            await self._drop_idle(peer_id)
            raise Unreachable(peer_id, {"stream": _short(exc)}) from None

    async def _drop_idle(self, peer_id: str) -> None:
        """Close the connections to a peer that carry no stream, after a stream on them failed to open.

        Under load we saw connections on which every new stream timed out
        (py-libp2p 0.8.1; the cause is unknown) while both event loops
        answered within 2 s; a retry reused the same connection until the
        worker closed it for want of proof.  A fresh dial has no such
        history, and leases on a connection that works are left alone.
        """
        for conn in self._connections(peer_id):
            if not conn.get_streams():
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await conn.close()
                    except Exception:  # noqa: BLE001 - broken already: nothing more to close
                        pass

    async def _connect(self, pid: ID, direct: list[Any], relayed: list[Any], head_start: float) -> None:
        """Dial every address, direct ones first; the first connection cancels the rest."""
        attempts: dict[str, str] = {}
        direct_done = trio.Event()

        async def dial(addr: Any, connect: Callable[[], Awaitable[Any]], cancel: trio.CancelScope) -> None:
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    await connect()
                cancel.cancel()
            except Exception as exc:
                attempts[str(addr)] = _short(exc)

        async def dial_relayed(addr: Any, cancel: trio.CancelScope) -> None:
            assert self._circuits is not None
            with trio.move_on_after(head_start):
                await direct_done.wait()
            await dial(addr, partial(self._circuits.dial, addr), cancel)

        async with trio.open_nursery() as nursery:
            async def directs() -> None:
                async with trio.open_nursery() as inner:
                    for addr in direct:
                        inner.start_soon(dial, addr, partial(self._host.get_network().dial_addr, addr, pid),
                                         nursery.cancel_scope)
                direct_done.set()

            nursery.start_soon(directs)
            if self._circuits is not None:
                for addr in relayed:
                    nursery.start_soon(dial_relayed, addr, nursery.cancel_scope)
            elif relayed:
                attempts.update({str(a): "this host has no relay support" for a in relayed})
        self._host.get_network().unblock_peer(pid)  # type: ignore[attr-defined]  # a failed dial must not block the next (DCUtR's included)
        if not self.connected(pid.to_base58()):
            raise Unreachable(pid.to_base58(), attempts)

    # -- connections -----------------------------------------------------------------
    def _connections(self, peer_id: str) -> list[Any]:
        return list(self._host.get_network().get_connections(ID.from_base58(peer_id)) or [])

    def connected(self, peer_id: str) -> bool:
        return bool(self._connections(peer_id))

    def has_direct(self, peer_id: str) -> bool:
        return any(not _conn_relayed(c) for c in self._connections(peer_id))

    async def wait_direct(self, peer_id: str) -> None:
        """Return once there is a direct (not relayed) connection to the peer."""
        while not self.has_direct(peer_id):
            await self._new_connection.setdefault(peer_id, trio.Event()).wait()

    def punch(self, peer_id: str) -> None:
        """Start DCUtR hole punching to a peer we reach through a relay, without waiting for it.

        (DCUtR would start by itself within 2 s; asking at once saves that.)
        """
        dcutr, nursery = self._dcutr, self._nursery
        if dcutr is not None and nursery is not None:
            async def punch() -> None:
                try:
                    await dcutr.initiate_hole_punch(ID.from_base58(peer_id))
                except Exception:  # noqa: BLE001 - DCUtR's own failures are its to log; we just stay relayed
                    pass
            nursery.start_soon(punch)

    async def direct_stream(self, peer_id: str) -> Any:
        """A new lease stream on a direct connection to the peer (libp2p prefers direct ones for new streams)."""
        try:
            stream = await self._host.new_stream(ID.from_base58(peer_id), [LEASE_PROTOCOL])
        except Exception as exc:
            raise ProtocolError(f"cannot open a stream on the direct connection: {_short(exc)}") from None
        if _conn_relayed(stream.muxed_conn):
            await stream.reset()
            raise ProtocolError("libp2p opened the stream on the relayed connection")
        return stream

    @staticmethod
    def stream_path(stream: Any) -> str:
        """``relayed`` or ``direct``: which kind of connection carries ``stream``."""
        return "relayed" if _conn_relayed(stream.muxed_conn) else "direct"


class _Connected(Notifee):
    """Wakes whoever waits for a new connection to a peer (a hole punch that succeeded)."""

    def __init__(self, events: dict[str, trio.Event]) -> None:
        self._events = events

    async def connected(self, network: Any, conn: Any) -> None:
        event = self._events.pop(conn.muxed_conn.peer_id.to_base58(), None)
        if event is not None:
            event.set()


def _conn_relayed(conn: Any) -> bool:
    try:
        return any(CIRCUIT in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


async def _close_connection(conn: Any) -> None:
    """Close ``conn`` until its socket is closed (the peer knows then), and forget it.

    py-libp2p then pauses 0.1 s twice before its own bookkeeping, for
    stream handlers that end with the host anyway: an executor's shutdown
    waited 0.2 s a worker connection, one after another.
    """
    async with trio.open_nursery() as nursery:

        async def close() -> None:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - already broken: nothing to close
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(close)
        closed = getattr(getattr(conn, "muxed_conn", None), "event_closed", None)  # (yamux: once its socket is)
        if closed is not None:
            await closed.wait()
            nursery.cancel_scope.cancel()
    try:
        swarm = conn.swarm
        if conn in swarm.connections.get(conn.muxed_conn.peer_id, ()):  # (py-libp2p removes it after its pauses)
            swarm.remove_conn(conn)
    except Exception:  # noqa: BLE001 - not a connection of a swarm: nothing to forget
        pass
