"""A worker tells the board (with a hello) when its slots turned busy, or free, unlike its last hello said
(it looks at each request it hears and whenever slots may have come free): our board sends requests to the
workers that said they are free first (board/fanout.py)."""

from __future__ import annotations

from p2pexec.protocol.resources import Need, Resources
from p2pexec.worker.decisions import HELLO_NEWS_EVERY, NEWS, WorkerCore


def test_a_worker_whose_slots_turned_otherwise_than_its_hello_said_sends_news():
    core = WorkerCore(Resources(2, 2, 1 << 30), me="w", python="3.12")
    now = 100.0

    def news() -> bool:
        told = NEWS in core.look_again(now)
        if told:
            core.hello_free(now)  # the hello the daemon sends for it
        return told

    assert not news()  # free, as last said
    core.reservations.reserve("lease", Need(), 2)
    assert news()  # busy now: the board should ask others first
    core.reservations.release("lease")
    assert not news()  # free again, but within HELLO_NEWS_EVERY of the last
    now += HELLO_NEWS_EVERY
    assert news()
    assert not news()  # said already
