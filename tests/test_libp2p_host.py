"""Our libp2p host makes only the connections it decides on (issue 16: py-libp2p's auto-connector)."""

from __future__ import annotations

import pytest
import trio

from p2pexec.transport.host import Libp2pHost

pytestmark = pytest.mark.timeout(60)


def test_a_host_never_dials_the_peers_it_knows_of_on_its_own():
    """py-libp2p 0.8.1 would dial peers of its peer store towards 512 connections; ours never does."""

    async def scenario() -> tuple[int, int]:
        async with Libp2pHost().running() as worker, Libp2pHost().running() as client:
            swarm = client._host.get_network()
            swarm.peerstore.add_addrs(worker._host.get_id(), worker._host.get_addrs(), 3600)  # as identify does
            await swarm.auto_connector.maybe_connect()  # what its background task and every disconnect would run
            return len(swarm.peerstore.peers_with_addrs()), len(swarm.get_connections(worker._host.get_id()) or [])

    known, connections = trio.run(scenario)
    assert known >= 1  # the peer store knows the worker, with an address to dial
    assert connections == 0, "py-libp2p's auto-connector dialled: see _no_auto_dials in host.py"
