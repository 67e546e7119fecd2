"""A stranger's TCP flood: idle sockets from one loopback source address, held and re-opened.

Used by tests/test_worker_floods.py and benchmarks/bench_worker_flood.py.
Every loop is bounded in count and time; :meth:`Flood.stop` closes every socket.
"""

from __future__ import annotations

import errno
import re
import selectors
import socket
import threading
import time
from pathlib import Path


def libp2p_port(log_path: Path) -> int:
    """The TCP port a LocalCluster worker listens on for libp2p, from its start-up log line."""
    found = re.search(r"listening on /ip4/127\.0\.0\.1/tcp/(\d+)", log_path.read_text())
    assert found, log_path.read_text()[-2000:]
    return int(found.group(1))


def open_idle(port: int, source: str, count: int, timeout: float = 10.0, batch: int = 64) -> list[socket.socket]:
    """Up to ``count`` sockets bound to ``source``, connected to 127.0.0.1:``port``, sending nothing.

    They connect a batch at a time (the listen backlog is 128; a SYN beyond it
    waits seconds for its retry), each batch for up to ``timeout`` s; those that
    did not connect by then are closed and left out.
    """
    connected: list[socket.socket] = []
    for start in range(0, count, batch):
        pending = []
        for _ in range(min(batch, count - start)):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.setblocking(False)
            if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                sock.close()
                continue
            pending.append(sock)
        with selectors.DefaultSelector() as sel:
            for sock in pending:
                sel.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + timeout
            while sel.get_map() and (remaining := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(remaining):
                    sel.unregister(key.fileobj)
                    sock = key.fileobj  # type: ignore[assignment]
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        connected.append(sock)
                    else:
                        sock.close()
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
    return connected


def closed_by_peer(sock: socket.socket) -> bool:
    """Has the other end closed (or reset) this readable socket?"""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_all_closed(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Wait up to ``timeout`` s for the peer to close every socket; return those still open (and close all)."""
    left = set(socks)
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while left and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(remaining):
                if closed_by_peer(key.fileobj):  # type: ignore[arg-type]
                    sel.unregister(key.fileobj)
                    left.discard(key.fileobj)  # type: ignore[arg-type]
    for sock in socks:
        sock.close()
    return list(left)


class Flood:
    """Hold ``size`` idle sockets from ``source`` to a port; re-open each one the peer closes.

    At most ``max_opened`` sockets are opened over the flood's life; ``stop()``
    closes all that are open.  ``opened`` and ``closed`` count them.
    """

    def __init__(self, port: int, source: str, size: int = 300, max_opened: int = 20_000) -> None:
        self.port, self.source, self.size, self.max_opened = port, source, size, max_opened
        self.opened = 0
        self.closed = 0  # by the peer
        self._stop = threading.Event()
        self._filled = threading.Event()  # the first ``size`` sockets were opened
        self._thread = threading.Thread(target=self._run, name=f"flood-{source}", daemon=True)

    def __enter__(self) -> "Flood":
        """Start, and return once the first ``size`` sockets were opened (at most 60 s)."""
        self._thread.start()
        self._filled.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        live: list[socket.socket] = []
        with selectors.DefaultSelector() as sel:
            try:
                while not self._stop.is_set():
                    want = min(self.size - len(live), self.max_opened - self.opened)
                    for sock in open_idle(self.port, self.source, want):
                        sel.register(sock, selectors.EVENT_READ)
                        live.append(sock)
                        self.opened += 1
                    self._filled.set()
                    for key, _ in sel.select(0.2):
                        sock = key.fileobj
                        if closed_by_peer(sock):  # type: ignore[arg-type]
                            sel.unregister(sock)
                            live.remove(sock)  # type: ignore[arg-type]
                            sock.close()  # type: ignore[union-attr]
                            self.closed += 1
                    if self.opened >= self.max_opened and not live:
                        break
            finally:
                for sock in live:
                    sock.close()
