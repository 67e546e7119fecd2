"""A worker tells the board (with a hello) when a request finds it busy, or free, unlike its last hello
said: our board sends requests to the workers that said they are free first (board/fanout.py)."""

from __future__ import annotations

from types import SimpleNamespace

from nacl.signing import SigningKey

from p2pexec.keys import Identity
from p2pexec.protocol import messages
from p2pexec.protocol.observers import AnswerObservers
from p2pexec.worker import daemon
from p2pexec.worker.daemon import HELLO_NEWS_EVERY, WorkerDaemon

ALICE = Identity(user="alice", signing_key=SigningKey.generate())


def request() -> messages.Message:
    line = messages.encode(ALICE, "alice/c", "request", {"req": "r", "n": 1, "py": "3.12"}, now=1e9, ttl=10)
    return messages.decode(line)


class Board:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, line: bytes) -> None:
        self.sent.append(line)


def worker(busy: set[int]) -> WorkerDaemon:
    """Just what ``_on_message`` reads before it answers a request (no host: it answers nothing)."""
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


def test_a_request_that_finds_the_worker_otherwise_than_its_hello_said_sends_news(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: clock[0])
    busy: set[int] = set()
    w = worker(busy)
    w._on_message(request())
    assert w.board.sent == []  # free, as last said
    busy |= {0, 1}
    w._on_message(request())
    assert w.board.sent == [b"hello"]  # busy now: the board should ask others first
    busy.clear()
    w._on_message(request())
    assert w.board.sent == [b"hello"]  # free again, but within HELLO_NEWS_EVERY of the last
    clock[0] += HELLO_NEWS_EVERY
    w._on_message(request())
    assert w.board.sent == [b"hello", b"hello"]
    w._on_message(request())
    assert len(w.board.sent) == 2  # said already
