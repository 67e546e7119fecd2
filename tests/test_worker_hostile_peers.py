"""A peer that sends garbage to a worker's libp2p port loses its stream; the daemon carries on."""

from __future__ import annotations

import re
import time

import pytest
import trio
from nacl.signing import SigningKey

from p2pexec.config import resolve
from p2pexec.keys import Identity
from p2pexec.protocol import messages
from p2pexec.protocol.frames import LENGTH, encode_frame
from p2pexec.status import collect
from p2pexec.transport.host import Libp2pHost

pytestmark = pytest.mark.timeout(90)


def _accept(identity: Identity, cluster: str) -> bytes:
    return messages.encode(identity, cluster, "accept", {"offer": "nope", "worker": "friend", "req": "r",
                                                         "kx": messages.b64(bytes(32)), "slots": 1},
                           now=time.time(), ttl=30)


async def _attack(peer: str, addrs: list[str], cluster: str, owner: Identity) -> int:
    attacks = [
        b"\x00\x01garbage that is not a frame",
        LENGTH.pack(1 << 31) + b"x" * 64,  # announces a 2 GiB frame
        encode_frame(b"{not json"),
        encode_frame(_accept(Identity("mallory", SigningKey.generate()), cluster)),  # not a member
        encode_frame(_accept(owner, cluster)),  # a member, but for no offer of this worker
        encode_frame(b"\x00" * 5000),  # too big for a handshake
    ]
    refused = 0
    async with Libp2pHost().running() as host:
        for attack in attacks:
            stream = await host.open_stream(peer, addrs)
            await stream.write(attack)
            with trio.fail_after(15):
                try:
                    while await stream.read(65536):
                        pass
                except Exception:
                    pass  # reset by the worker: what we expect
            refused += 1
    return refused


def _listening(log_text: str) -> tuple[str, list[str]]:
    """The peer id and addresses a worker logs at start (hellos carry no loopback address)."""
    found = re.search(r"peer (\S+) listening on (.+?) \(reachability", log_text)
    assert found, log_text
    return found.group(1), found.group(2).split()


def test_garbage_on_the_lease_protocol_never_kills_the_worker(cluster):
    who = resolve(cluster.cluster, board=cluster.board, identity=cluster.identity, members=cluster.members)
    peer, addrs = _listening(cluster.workers[0].log_path.read_text())
    refused = trio.run(_attack, peer, addrs, cluster.cluster, who.identity)
    assert refused == 6
    assert all(w.popen.poll() is None for w in cluster.workers)
    after = collect(who, 1.0, known_hosts=cluster.known_hosts)
    assert peer in {w["node"] for w in after["workers"]}  # its loop still answers
    with cluster.executor() as ex:
        assert sorted(ex.map(abs, range(-20, 0))) == list(range(1, 21))
