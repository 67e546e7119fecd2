"""Strangers flooding a worker's libp2p port cannot lock its members out (issue 15, libp2p side).

Attackers bind their own loopback source addresses (127.0.0.2, 127.0.0.3),
so the worker's per-address limits apply as they would to remote hosts.
"""

from __future__ import annotations

import pytest
import trio

from p2pexec import LocalCluster
from p2pexec.transport.admission import Limits
from p2pexec.transport.host import PROVE_SECONDS, Libp2pHost, Notifee

from .flood import Flood, libp2p_port, open_idle, wait_all_closed

pytestmark = pytest.mark.timeout(180)

SLACK = 10.0  # a loaded 2-core machine: the worker closes within its deadline plus this


@pytest.fixture(scope="module")
def lonely():
    """A cluster of its own with one worker, so the flood troubles no other test."""
    with LocalCluster(workers=1) as lc:
        yield lc


def test_a_member_gets_results_while_strangers_flood_the_worker(lonely):
    port = libp2p_port(lonely.workers[0].log_path)
    with Flood(port, "127.0.0.2", size=300, max_opened=5000) as one, \
            Flood(port, "127.0.0.3", size=300, max_opened=5000) as two:
        with lonely.executor() as ex:
            assert ex.submit(pow, 2, 3).result(timeout=60) == 8
            assert sorted(ex.map(abs, range(-10, 0), timeout=60)) == list(range(1, 11))
        assert one.closed > 0 and two.closed > 0  # refused or timed out by the worker, not by us
    assert "refused (source)" in lonely.workers[0].log_path.read_text()  # the operator is told, once per 10 s
    assert lonely.workers[0].popen.poll() is None


def test_idle_sockets_are_closed_by_the_handshake_deadline(lonely):
    port = libp2p_port(lonely.workers[0].log_path)
    socks = open_idle(port, "127.0.0.2", 300) + open_idle(port, "127.0.0.3", 300)
    assert len(socks) >= 500  # (a few may not connect in time on a busy machine)
    assert wait_all_closed(socks, Limits.handshake_seconds + SLACK) == []
    with lonely.executor() as ex:  # and the worker serves on
        assert ex.submit(pow, 3, 2).result(timeout=60) == 9


class _Gone(Notifee):
    def __init__(self) -> None:
        self.event = trio.Event()

    async def disconnected(self, network, conn) -> None:
        self.event.set()


def test_a_stranger_that_completes_the_handshake_but_proves_nothing_is_closed(lonely):
    """Keys are free: finishing Noise proves nothing, so the peer must show a member's accept in time."""
    text = lonely.workers[0].log_path.read_text()
    peer = text.split(" peer ", 1)[1].split()[0]

    async def stranger() -> float:
        async with Libp2pHost().running() as host:
            gone = _Gone()
            host.host.get_network().register_notifee(gone)
            stream = await host.open_stream(peer, [f"/ip4/127.0.0.1/tcp/{libp2p_port(lonely.workers[0].log_path)}"])
            start = trio.current_time()
            with trio.fail_after(PROVE_SECONDS + SLACK):
                await gone.event.wait()  # the worker hung up (it reset the lease stream long before)
            assert stream is not None
            return trio.current_time() - start

    waited = trio.run(stranger)
    assert waited > 1.0  # it was let in, then closed for not proving membership (not refused at once)


def test_only_noise_is_ever_negotiated():
    """new_host's defaults would also accept /plaintext/2.0.0 and secio peers."""
    host = Libp2pHost()
    assert list(host.host.get_network().upgrader.security_multistream.transports) == ["/noise"]
