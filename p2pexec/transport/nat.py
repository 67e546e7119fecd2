"""A peer's place in the network: which relay it joined, how it is seen, which addresses others may dial.

Shared by workers (which reserve a relay circuit when the relay could not
dial them back) and clients (which join a relay to dial circuits through
it and to learn their public address).  The rules are pure and live in
:mod:`p2pexec.protocol.reach`; this is the I/O around them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterable

import trio

from ..board.client import BoardSession
from ..keys import Identity
from ..protocol.reach import CIRCUIT, NetView, Reachability, addrs_for
from .host import Libp2pHost, RelayJoin, RelayRefused, Unreachable

log = logging.getLogger("p2pexec.nat")

KEEP_EVERY = 15.0


def local_netid() -> str:
    """Same value for processes that share a network namespace on one machine (and so share loopback)."""
    try:
        machine = open("/etc/machine-id").read().strip()
    except OSError:
        machine = socket.gethostname()
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = ""
    return hashlib.sha256(f"{machine}/{netns}".encode()).hexdigest()[:16]


class NatTraversal:
    def __init__(self, host: Libp2pHost, identity: Identity, *, serve: bool) -> None:
        self.host = host
        self.identity = identity
        self.serve = serve  # a worker: reserve a circuit when the relay cannot dial us back
        self.view = NetView(local_netid())
        self.state = Reachability()
        self.candidates: list[str] = []
        self._joined: dict[str, RelayJoin] = {}  # relay peer id -> what it told us
        self._warned = False
        self._lock = trio.Lock()

    def add_candidates(self, relays: Iterable[str]) -> bool:
        """Remember relay addresses (configured, from the board, or announced by the owner); True if new."""
        new = [r for r in relays if r not in self.candidates]
        self.candidates.extend(new)
        return bool(new)

    async def ask_board(self, board: BoardSession) -> None:
        """Add the relay the board names (``p2pexec board`` runs one; pico.sh has none)."""
        relays, _ = await trio.to_thread.run_sync(board.ask_relay)
        self.add_candidates(relays)

    def addrs_for(self, theirs: NetView | None) -> list[str]:
        return addrs_for(self.host.addrs, self.view, self.state, theirs)

    async def join_any(self) -> bool:
        """Join the first candidate relay that takes us; False (warned once) if none does."""
        async with self._lock:
            errors: dict[str, str] = {}
            for relay in self.candidates:
                try:
                    join = await self.host.join_relay(relay, self.identity, check_ports=self.serve,
                                                      reserve=lambda j: self.serve and not j.reachable)
                except (RelayRefused, Unreachable, trio.TooSlowError) as exc:
                    errors[relay] = str(exc) or "timed out"
                    continue
                self._record(join)
                return True
            if errors and not self._warned:
                self._warned = True
                log.warning("no relay took us (%s); peers behind a NAT may not reach this %s",
                            "; ".join(f"{r}: {e}" for r, e in errors.items()), "worker" if self.serve else "client")
            return False

    def _record(self, join: RelayJoin) -> None:
        self._joined[join.relay.rsplit("/p2p/", 1)[-1]] = join
        if self.state.circuits and not join.circuit and self.state.checked:
            return  # a second relay we joined only to dial through: keep what the first told us
        public = tuple(f"/ip4/{join.seen}/tcp/{p}" for p in join.reachable) if join.seen else ()
        self.state = Reachability(public, (join.circuit,) if join.circuit else (), True, join.seen)
        self.view = NetView(self.view.netid, join.seen)
        self._warned = False
        log.info("relay %s sees us at %s: %s", join.relay, join.seen or "?",
                 f"reachable at {', '.join(public)}" if public else
                 f"not reachable directly; reachable through {join.circuit}" if join.circuit else
                 "not reachable directly")

    async def member_of(self, circuit: str) -> None:
        """Make sure we presented our ticket to the relay of ``circuit`` (a relay serves members only)."""
        relay = circuit.split(CIRCUIT, 1)[0]
        relay_id = relay.rsplit("/p2p/", 1)[-1]
        if relay_id in self._joined and self.host.connected(relay_id):
            return
        async with self._lock:
            if relay_id in self._joined and self.host.connected(relay_id):
                return
            join = await self.host.join_relay(relay, self.identity, reserve=lambda j: False, check_ports=False)
            self._joined[relay_id] = join
            if not self.state.checked:
                self.view = NetView(self.view.netid, join.seen)

    async def keep(self) -> None:
        """Rejoin when the relay we hold a reservation on went away (restarted, network change)."""
        while True:
            await trio.sleep(KEEP_EVERY)
            held = [rid for rid, j in self._joined.items() if j.circuit]
            if self.candidates and (not self.state.checked or any(not self.host.connected(r) for r in held)):
                for rid in held:
                    self._joined.pop(rid, None)
                await self.join_any()
