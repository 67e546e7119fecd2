"""A worker tells the board (with a hello) when its slots turned busy, or free, unlike its last hello said
(it looks at each request it hears and whenever slots may have come free): our board sends requests to the
workers that said they are free first (board/fanout.py)."""

from __future__ import annotations

from p2pexec.protocol.resources import Need, Resources
from p2pexec.worker.decisions import HELLO_NEWS_EVERY, NEWS, Recheck, WorkerCore


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


def test_news_held_back_asks_to_look_again_when_it_is_due_once_for_each_hello():
    core = WorkerCore(Resources(1, 1, 1 << 30), me="w", python="3.12")
    now = 100.0
    core.reservations.reserve("lease", Need(), 1)
    assert NEWS in core.look_again(now)
    core.hello_free(now)  # says busy
    core.reservations.release("lease")  # the lease ended within the second
    assert core.look_again(now + 0.1) == [Recheck(now + HELLO_NEWS_EVERY)]
    assert core.look_again(now + 0.2) == []  # asked already
    assert core.look_again(now + HELLO_NEWS_EVERY) == [NEWS]  # the daemon looks again then
    core.reservations.reserve("lease", Need(), 1)  # busy again before the recheck: nothing to tell
    core.hello_free(now + 1.5)
    core.reservations.release("lease")
    assert core.look_again(now + 1.6) == [Recheck(now + 1.5 + HELLO_NEWS_EVERY)]
    core.reservations.reserve("lease", Need(), 1)
    assert core.look_again(now + 1.5 + HELLO_NEWS_EVERY) == []  # busy, as last said
