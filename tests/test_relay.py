"""The member relay on loopback: only members use it, per-member limits hold, reservations are freed,
and the board tells members where its relay is (checked with the real OpenSSH client)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from nacl.signing import SigningKey

from p2pexec.board.address import BoardAddress
from p2pexec.board.client import BoardSession
from p2pexec.board.server import BoardServer, RelayAddress, load_or_create_host_key
from p2pexec.keys import Identity, Keyring, generate_identity_file, load_identity
from p2pexec.protocol import messages
from p2pexec.transport.host import Libp2pHost, RelayRefused
from p2pexec.transport.relay import RelayPolicy, running_relay

pytestmark = pytest.mark.timeout(60)

ALICE, BOB, MALLORY = (Identity(u, SigningKey.generate()) for u in ("alice", "bob", "mallory"))
MEMBERS = Keyring({"alice": {ALICE.public_key}, "bob": {BOB.public_key}})
SSH = "/usr/bin/ssh"


async def echo(stream) -> None:
    while data := await stream.read(65536):
        await stream.write(data)


async def _relay_scenario() -> dict[str, object]:
    seen: dict[str, object] = {}
    policy = RelayPolicy(reservations_per_member=1)
    async with running_relay("/ip4/127.0.0.1/tcp/0", policy, MEMBERS.allows) as (relay_host, relay):
        address = f"{relay_host.addrs[0]}/p2p/{relay_host.peer_id}"
        async with Libp2pHost(nat_traversal=True).running() as worker:
            worker.set_handler(echo)
            join = await worker.join_relay(address, ALICE, reserve=lambda j: True)
            seen["join"] = join
            async with Libp2pHost(nat_traversal=True).running() as second:  # alice's second peer: over her limit
                with pytest.raises(RelayRefused, match="reservation"):
                    await second.join_relay(address, ALICE, reserve=lambda j: True)
            async with Libp2pHost(nat_traversal=True).running() as stranger:
                with pytest.raises(RelayRefused, match="not a member"):
                    await stranger.join_relay(address, MALLORY, reserve=lambda j: True)
                # skipping the ticket and asking for a reservation directly
                await stranger.host.connect(PeerInfo(ID.from_base58(relay_host.peer_id), [Multiaddr(address)]))
                hop = await stranger.host.new_stream(ID.from_base58(relay_host.peer_id), [HOP_PROTOCOL])
                await write_delimited_msg(hop, HopMessage(type=HopMessage.RESERVE))
                seen["raw_reserve"] = StatusCode((await read_delimited_msg(hop, HopMessage)).status)
            async with Libp2pHost(nat_traversal=True).running() as client:
                await client.join_relay(address, BOB, reserve=lambda j: False)
                assert join.circuit is not None
                stream = await client.open_stream(worker.peer_id, [join.circuit])
                seen["path"] = client.stream_path(stream)
                await stream.write(b"through the relay")
                seen["echo"] = await stream.read(100)
        with trio.fail_after(10):  # alice's worker left: its reservation goes with it
            while any(u == "alice" for u in relay.members.values()):
                await trio.sleep(0.02)
        async with Libp2pHost(nat_traversal=True).running() as again:
            seen["again"] = await again.join_relay(address, ALICE, reserve=lambda j: True)
        seen["refused"] = dict(relay.refused)
    return seen


def test_only_members_use_the_relay_within_their_limits_and_reservations_are_freed():
    seen = trio.run(_relay_scenario)
    join = seen["join"]
    assert join.seen == "127.0.0.1" and join.circuit and join.circuit.endswith("/p2p-circuit")
    assert join.reachable  # the relay dialled the worker's port back on a fresh connection
    assert seen["raw_reserve"] == StatusCode.PERMISSION_DENIED
    assert seen["path"] == "relayed" and seen["echo"] == b"through the relay"
    assert seen["again"].circuit  # a freed reservation, not a permanently full relay
    assert seen["refused"] == {"reservations": 1, "ticket": 1, "not-a-member": 1}


# -- the board names its relay ---------------------------------------------------------
@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for user in ("alice", "bob"):
        generate_identity_file(tmp_path / user, comment=user)
    return tmp_path


def _board(keys: Path, relay: RelayAddress | None) -> BoardServer:
    users = Keyring.parse("".join(f"{u} {(keys / f'{u}.pub').read_text()}" for u in ("alice", "bob")))
    board = BoardServer(host_key=load_or_create_host_key(keys / "host_key"), users=users,
                        state_dir=keys / "state", relay=relay)
    board.start()
    return board


@pytest.mark.skipif(not Path(SSH).exists(), reason="needs the OpenSSH client")
@pytest.mark.parametrize("announce", [(), ("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWrelay",)])
def test_the_board_tells_a_member_where_its_relay_is_and_how_it_sees_them(keys, announce):
    board = _board(keys, RelayAddress("12D3KooWrelay", 4001, announce))
    try:
        out = subprocess.run(
            [SSH, "-F", "/dev/null", "-T", "-p", str(board.port), "-i", str(keys / "bob"),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
             "-o", "LogLevel=ERROR", "bob@127.0.0.1", "relay"], capture_output=True, timeout=30, check=True)
    finally:
        board.stop()
    answer = json.loads(out.stdout)
    assert answer["seen"] == "127.0.0.1"
    assert answer["relays"] == (list(announce) or ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWrelay"])


@pytest.mark.parametrize("relay", [RelayAddress("12D3KooWrelay", 4001), None])
def test_board_sessions_ask_for_the_relay(keys, relay):
    board = _board(keys, relay)
    board.set_members("alice/friends", ["bob"])
    known = keys / "known_hosts"
    alice = load_identity("alice", keys / "alice")
    session = BoardSession(
        BoardAddress("127.0.0.1", board.port, "alice"),
        alice, "alice/friends", inbox=messages.Inbox("alice/friends", board.users), on_message=lambda m: None,
        make_hello=lambda: messages.encode(alice, "alice/friends", "hello", {"role": "observer"},
                                           now=time.time(), ttl=30),
        known_hosts=known, accept_new_host_key=True)
    session.open()
    try:
        relays, seen = session.ask_relay()
    finally:
        session.close()
        board.stop()
    assert seen == "127.0.0.1"
    assert relays == (["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWrelay"] if relay else [])


def test_a_watched_members_file_takes_removals_at_once_and_survives_a_bad_edit(tmp_path):
    from p2pexec.keys import WatchedKeyring, openssh_public_line

    path = tmp_path / "members"
    path.write_text(f"alice {openssh_public_line(ALICE.public_key)}\nbob {openssh_public_line(BOB.public_key)}\n")
    members = WatchedKeyring(path)
    assert members.allows("bob", BOB.public_key)
    path.write_text(f"alice {openssh_public_line(ALICE.public_key)}\n")  # bob removed
    assert not members.allows("bob", BOB.public_key) and members.allows("alice", ALICE.public_key)
    path.write_text("alice not-a-key-type AAAA\n")  # a broken edit keeps the last good list
    assert members.allows("alice", ALICE.public_key)


def test_p2pexec_relay_needs_to_know_who_may_use_it(capsys):
    from p2pexec.cli import main

    assert main(["relay", "--listen", "127.0.0.1:0"]) == 1
    assert "say who may use the relay: --members FILE" in capsys.readouterr().err


def test_p2pexec_relay_alone_prints_its_address_and_stops_on_sigterm_and_keeps_its_id(tmp_path):
    import signal
    import sys

    from p2pexec.keys import openssh_public_line

    members = tmp_path / "members"
    members.write_text(f"alice {openssh_public_line(ALICE.public_key)}\n")
    ids = []
    for run in range(2):  # members given the address by hand must not lose the relay when it restarts
        proc = subprocess.Popen([sys.executable, "-m", "p2pexec.cli", "relay", "--members", str(members),
                                 "--listen", "127.0.0.1:0", "--key", str(tmp_path / "relay_key")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = [proc.stdout.readline() for _ in range(3)]
            assert lines[0].startswith("p2pexec relay listening on port"), lines
            address = lines[1].strip()
            assert address.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in address, lines
            assert "--relay ADDRESS" in lines[2], lines
            ids.append(address.rpartition("/p2p/")[2])

            async def join() -> object:
                async with Libp2pHost(nat_traversal=True).running() as host:
                    return await host.join_relay(address, ALICE, reserve=lambda j: True)

            assert trio.run(join).circuit  # a member is served by the process just started
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            proc.kill()
            proc.wait()
    assert ids[0] == ids[1]
