"""A worker tells the board (with a hello) when its slots turned busy, or free, unlike its last hello said
(it looks at each request it hears and whenever slots may have come free): our board sends requests to the
workers that said they are free first (board/fanout.py)."""

from __future__ import annotations

from types import SimpleNamespace

from p2pexec.protocol.observers import AnswerObservers
from p2pexec.worker import daemon
from p2pexec.worker.daemon import HELLO_NEWS_EVERY, WorkerDaemon


class Board:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, line: bytes) -> None:
        self.sent.append(line)


def worker(busy: set[int]) -> WorkerDaemon:
    """Just what ``_tell_news`` reads."""
    w = WorkerDaemon.__new__(WorkerDaemon)
    w.config = SimpleNamespace(slots=2)  # type: ignore[assignment]
    w.reservations = SimpleNamespace(busy=busy)  # type: ignore[assignment]
    w.board, w.host, w._observers = Board(), None, AnswerObservers()  # type: ignore[assignment]
    w._said_free = (True, -1e9)

    def hello() -> bytes:
        w._said_free = (len(busy) < 2, daemon.time.monotonic())
        return b"hello"
    w._hello = hello  # type: ignore[method-assign]
    return w


def test_a_worker_whose_slots_turned_otherwise_than_its_hello_said_sends_news(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: clock[0])
    busy: set[int] = set()
    w = worker(busy)
    w._tell_news()
    assert w.board.sent == []  # free, as last said
    busy |= {0, 1}
    w._tell_news()
    assert w.board.sent == [b"hello"]  # busy now: the board should ask others first
    busy.clear()
    w._tell_news()
    assert w.board.sent == [b"hello"]  # free again, but within HELLO_NEWS_EVERY of the last
    clock[0] += HELLO_NEWS_EVERY
    w._tell_news()
    assert w.board.sent == [b"hello", b"hello"]
    w._tell_news()
    assert len(w.board.sent) == 2  # said already
