"""A py-libp2p host configured the only way p2pexec accepts: TCP, Noise, yamux.

Plaintext and secio are never offered (new_host's defaults would accept
them), and one connection per peer avoids py-libp2p's 250 ms dial delay.
Importing libp2p costs about half a second, so this module is imported only
where a host is really started.

With ``nat_traversal`` the host can also hold a reservation on a member
relay (so peers behind NATs reach it through a circuit), accept relayed
connections, and upgrade them to direct ones by DCUtR hole punching.

Every TCP connection accepted on our listening ports passes
:class:`_Gate` first, which applies :mod:`p2pexec.transport.admission`:
a limit per source address on connections not yet proved, a short
deadline for the Noise handshake and, with ``members_only``, for proving
membership (:meth:`Libp2pHost.proved`), and a reserve for members'
addresses.  py-libp2p's own limits are set below (``_connection_config``,
``_resource_manager``), each with the reason for its value.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator

import multiaddr
import trio
from multiaddr.protocols import P_P2P
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.rcmgr import ResourceLimits, ResourceManager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.relay.circuit_v2 import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, DCUtRProtocol, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp.tcp import TCP, TCPListener

from ..errors import ProtocolError
from ..keys import Identity
from ..logs import after_libp2p_import
from ..protocol.reach import CIRCUIT, direct_and_relayed, make_ticket, split_tcp
from .admission import Admission, Limits, Refused, Reporter, Ticket
from .channel import FramedStream
from .yamux_window import release_in_halves

after_libp2p_import()

LEASE_PROTOCOL = TProtocol("/p2pexec/lease/1.0.0")
TICKET_PROTOCOL = TProtocol("/p2pexec/relay-ticket/1.0.0")

# py-libp2p's yamux sends a WINDOW_UPDATE frame after every read unless told
# otherwise; go-yamux's half-window hysteresis (what remains) is enough and
# saves a frame, a write and a wake-up per message.  A user's setting wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ALL_INTERFACES = "/ip4/0.0.0.0/tcp/0"
DIRECT_HEAD_START = 0.3   # a relayed dial starts this long after the direct one, or when it fails
DIAL_TIMEOUT = 5.0
RELAY_JOIN_TIMEOUT = 10.0
_CLIENT_LIMITS = RelayLimits(duration=0, data=0, max_circuit_conns=64, max_reservations=4)
log = logging.getLogger("p2pexec.transport")

# py-libp2p's own connection limits.  Its defaults are go-libp2p's for a DHT
# node (keep 50-100 peers connected, dial more, prune above 300); a worker or
# a relay only answers peers that come to it.
MAX_CONNECTIONS = 1024  # established or upgrading; a relay's members and a busy worker's clients fit
UPGRADE_SECONDS = Limits.handshake_seconds  # Noise + yamux negotiation; the gate closes it at the same time
STREAM_NEGOTIATION_SECONDS = 10.0  # multistream-select for a new stream (py-libp2p's default; ms in practice)
MAX_STREAMS = 8192  # py-libp2p's stream semaphore over all peers (leases use one stream each, relays two)


def _connection_config(per_peer: int) -> ConnectionConfig:
    return ConnectionConfig(
        max_connections_per_peer=per_peer,  # 1 avoids py-libp2p's 250 ms dial delay; 4 for relayed + direct
        max_connections=MAX_CONNECTIONS,
        # The swarm lets (max - min) connections in before any authentication; with
        # min 0 that is all of them, and the gate (not this count) stops strangers.
        # (The auto-connector, which would dial towards their midpoint, never runs: _no_auto_dials.)
        # High = max keeps the pruner from closing members' connections below the cap.
        min_connections=0, low_watermark=0, high_watermark=MAX_CONNECTIONS,
        inbound_upgrade_timeout=UPGRADE_SECONDS,
        outbound_upgrade_timeout=UPGRADE_SECONDS,  # a peer that stalls our handshake is as useless
        inbound_stream_protocol_negotiation_timeout=STREAM_NEGOTIATION_SECONDS,
        outbound_stream_protocol_negotiation_timeout=STREAM_NEGOTIATION_SECONDS,
        dial_timeout=DIAL_TIMEOUT,
    )


def _resource_manager() -> ResourceManager:
    """py-libp2p's resource manager with limits matching the above (its own are 256 inbound, a breaker, ...)."""
    return ResourceManager(
        limits=ResourceLimits(max_connections=MAX_CONNECTIONS, max_streams=MAX_STREAMS),
        connection_limits=ConnectionLimits(
            max_pending_inbound=Limits.strangers + Limits.reserve,  # what the gate lets in unproven
            max_pending_outbound=64,
            max_established_inbound=MAX_CONNECTIONS, max_established_outbound=MAX_CONNECTIONS,
            max_established_per_peer=4, max_established_total=MAX_CONNECTIONS),
        # Its circuit breaker would refuse every connection for 60 s after 5 internal
        # errors: one peer's trouble must not lock out the others.
        enable_circuit_breaker=False,
        # Per peer id, after the handshake: a peer re-connecting 50 times in a burst is
        # a bug or an attack (keys are free, so this is no defence against strangers).
        enable_rate_limiting=True, connections_per_peer_per_sec=10.0, burst_connections_per_peer=50.0,
        enable_prometheus=False,
    )


def _no_auto_dials(swarm: Any) -> None:
    """Keep py-libp2p's AutoConnector from ever starting: p2pexec hosts make only the connections they decide on.

    py-libp2p 0.8.1 dials peers from its peer store until (low + high
    watermark) / 2 connections are open: 512 with the watermarks above, so a
    worker dialled back every client that ever reached it and a client every
    worker it once leased, each a Noise handshake on both sides.  It has no
    switch (``auto_connect_interval`` must be positive), so its ``start`` is
    made a no-op; ``tests/test_libp2p_host.py`` fails if that stops working.
    """
    async def stay_stopped() -> None:
        return None

    swarm.auto_connector.start = stay_stopped


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


class Libp2pHost:
    """One host per process; runs inside a trio loop via :meth:`running`."""

    def __init__(self, listen: Sequence[str] = (LOOPBACK,), *, nat_traversal: bool = False,
                 members_only: bool = False, limits: Limits | None = None) -> None:
        """``members_only``: close a TCP connection accepted from a peer that has not proved membership
        (:meth:`proved`) within ``limits.prove_seconds`` (default :data:`PROVE_SECONDS`) of its handshake."""
        key_pair = create_new_key_pair()
        self._listen = [multiaddr.Multiaddr(a) for a in listen]
        if limits is None:
            limits = Limits(prove_seconds=PROVE_SECONDS if members_only else None)
        self._gate = _Gate(Admission(limits))
        self._host = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(key_pair, create_x25519_key_pair().private_key)},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=self._listen,
            transports=[_GatedTCP(self._gate)],
            connection_config=_connection_config(4 if nat_traversal else 1),
            resource_manager=_resource_manager(),
        )
        self.peer_id: str = self._host.get_id().to_base58()
        self.nat_traversal = nat_traversal
        self._circuits: CircuitV2Transport | None = None
        self._dcutr: DCUtRProtocol | None = None
        self._dial_locks: dict[str, trio.Lock] = {}
        self._new_connection: dict[str, trio.Event] = {}  # peer id -> set when a connection to it opens
        _no_auto_dials(self._host.get_network())
        release_in_halves()
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
            for conns in list(self._host.get_network().connections.values()):
                for conn in list(conns):
                    try:
                        await conn.close()
                    except Exception:  # noqa: BLE001 - already broken: nothing to close
                        pass

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


class Notifee(INotifee):
    """py-libp2p's network notifications, each ignored unless a subclass overrides it."""

    async def connected(self, network: Any, conn: Any) -> None: ...
    async def disconnected(self, network: Any, conn: Any) -> None: ...
    async def opened_stream(self, network: Any, stream: Any) -> None: ...
    async def closed_stream(self, network: Any, stream: Any) -> None: ...
    async def listen(self, network: Any, multiaddr: Any) -> None: ...
    async def listen_close(self, network: Any, multiaddr: Any) -> None: ...


class _Connected(Notifee):
    """Wakes whoever waits for a new connection to a peer (a hole punch that succeeded)."""

    def __init__(self, events: dict[str, trio.Event]) -> None:
        self._events = events

    async def connected(self, network: Any, conn: Any) -> None:
        event = self._events.pop(conn.muxed_conn.peer_id.to_base58(), None)
        if event is not None:
            event.set()


PROVE_SECONDS = 15.0  # a worker's client sends its accept at once; the worker allows 10 s for it


@dataclass(eq=False)
class _Pending:
    """One gated TCP connection on its way from accept() to settled."""

    ticket: Ticket
    handshaken: trio.Event = field(default_factory=trio.Event)
    proved: trio.Event = field(default_factory=trio.Event)
    gone: trio.Event = field(default_factory=trio.Event)
    conn: Any = None  # py-libp2p's connection, once upgraded
    peer: Any = None  # and its peer id


class _Gate(Notifee):
    """The I/O half of :class:`Admission`: wraps py-libp2p's handler of each accepted TCP connection.

    It refuses a connection over its source's limit before libp2p sees it,
    cancels libp2p's upgrade at the handshake deadline, closes a connection
    whose peer does not prove membership in time, and, once a connection
    closes, ends libp2p's handler for it: py-libp2p 0.8.1 keeps that handler
    (and its inbound-limit token) until the host stops, so 250 connections
    over a host's life would otherwise lock everyone out.
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self._reporter = Reporter()
        self._handshaking: dict[tuple[str, int], _Pending] = {}  # remote (ip, port) -> upgrade under way
        self._upgraded: dict[Any, _Pending] = {}  # libp2p connection -> its gate entry
        self._proving: dict[Any, list[_Pending]] = {}  # peer id -> its connections waiting for its proof
        self._members: set[Any] = set()  # peer ids that proved membership, while connected

    def wrap(self, handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def gated(stream: Any) -> None:
            remote = stream.get_remote_address()
            try:
                verdict = self.admission.open(remote[0], trio.current_time())
            except (TypeError, ValueError):  # no IP address: not a connection we can count
                return await handler(stream)
            if isinstance(verdict, Refused):
                self._report()
                return await _close(stream)
            pending = _Pending(verdict)
            self._handshaking[remote] = pending
            try:
                async with trio.open_nursery() as nursery:
                    async def libp2p() -> None:
                        await handler(stream)
                        nursery.cancel_scope.cancel()  # the upgrade failed: nothing left to watch
                    nursery.start_soon(libp2p)
                    await self._watch(pending)
                    nursery.cancel_scope.cancel()  # ends libp2p's handler, which frees its inbound token
            finally:
                if self._handshaking.get(remote) is pending:
                    del self._handshaking[remote]
                self._upgraded.pop(pending.conn, None)
                self.admission.close(pending.ticket)
                await _close(stream)

        return gated

    async def _watch(self, pending: _Pending) -> None:
        ticket = pending.ticket
        with trio.move_on_at(ticket.deadline):
            await pending.handshaken.wait()
        if not pending.handshaken.is_set():
            self.admission.expired(ticket)
            self._report()
            return
        if self.admission.handshaken(ticket, trio.current_time()) and pending.peer not in self._members:
            self._proving.setdefault(pending.peer, []).append(pending)
            with trio.move_on_at(ticket.deadline):
                await _either(pending.proved, pending.gone)
            if pending.gone.is_set():
                return
            if not pending.proved.is_set():
                self.admission.expired(ticket)
                self._report()
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await pending.conn.close()
                return
        if self.admission.limits.prove_seconds is not None:
            self.admission.proved(ticket, trio.current_time())
        await pending.gone.wait()

    def proved(self, peer: Any) -> None:
        self._members.add(peer)
        for pending in self._proving.pop(peer, ()):
            pending.proved.set()

    def _report(self) -> None:
        news = self._reporter.due(self.admission, trio.current_time())
        if news:
            log.warning("libp2p port: %s in the last %g s (limits: %d unproven per address, %d in all + %d "
                        "for members' addresses)", ", ".join(f"{v} {k}" for k, v in sorted(news.items())),
                        self._reporter.every, self.admission.limits.per_source, self.admission.limits.strangers,
                        self.admission.limits.reserve)

    # -- py-libp2p's notifications ---------------------------------------------------------
    async def connected(self, network: Any, conn: Any) -> None:
        try:
            remote = conn.muxed_conn.get_remote_address()
        except Exception:  # noqa: BLE001 - a relayed connection: not one of ours
            return
        pending = self._handshaking.pop(remote, None) if remote else None
        if pending is not None:
            pending.conn, pending.peer = conn, conn.muxed_conn.peer_id
            self._upgraded[conn] = pending
            pending.handshaken.set()

    async def disconnected(self, network: Any, conn: Any) -> None:
        pending = self._upgraded.pop(conn, None)
        if pending is not None:
            pending.gone.set()
            waiting = self._proving.get(pending.peer)
            if waiting and pending in waiting:
                waiting.remove(pending)
                if not waiting:
                    del self._proving[pending.peer]
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self._members.discard(peer)


async def _either(a: trio.Event, b: trio.Event) -> None:
    """Return once ``a`` or ``b`` is set."""
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()
        nursery.start_soon(wait, a)
        nursery.start_soon(wait, b)


async def _close(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - already closed or broken: nothing to close
            pass


class _GatedTCP(TCP):
    """py-libp2p's TCP transport, with every accepted connection handed to the gate first."""

    def __init__(self, gate: _Gate) -> None:
        super().__init__()
        self._gate = gate

    def create_listener(self, handler_function: Any) -> TCPListener:
        return TCPListener(self._gate.wrap(handler_function))


def _conn_relayed(conn: Any) -> bool:
    try:
        return any(CIRCUIT in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False
