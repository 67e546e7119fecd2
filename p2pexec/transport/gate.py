"""The gate on our libp2p TCP port: the I/O half of :mod:`p2pexec.transport.admission`.

Every TCP connection accepted on our listening ports passes :class:`Gate`
first: a limit per source address on connections not yet proved, a short
deadline for the Noise handshake and, on a members-only host, for proving
membership (:meth:`~p2pexec.transport.host.Libp2pHost.proved`), and a
reserve for members' addresses.  It is its own module because it is its own
job, done beside py-libp2p rather than with it: it wraps the listener's
handler (:class:`GatedTCP`) and follows py-libp2p's connection notifications.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.transport.tcp.tcp import TCP, TCPListener

from .admission import Admission, Refused, Reporter, Ticket
from .libp2p_config import Notifee

log = logging.getLogger("p2pexec.transport")

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


class Gate(Notifee):
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


class GatedTCP(TCP):
    """py-libp2p's TCP transport, with every accepted connection handed to the gate first."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self._gate = gate

    def create_listener(self, handler_function: Any) -> TCPListener:
        return TCPListener(self._gate.wrap(handler_function))
