"""The board's threads: each one named, logged if it dies of an unexpected error, and joined at stop in
bounded time.

The board runs on plain threads (see :mod:`.server` for which), started from
many places: the accept loop, paramiko's connection threads, sessions ending
one another.  :class:`Threads` keeps the set of those alive so that
:meth:`.BoardServer.stop` can wait for them, and no further than its deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("p2pexec.board")


class Threads:
    """The threads started through :meth:`spawn` and still running; ``lock`` guards the set (the board's
    own lock, so a thread is never both started and missed by a stop)."""

    def __init__(self, lock: threading.Condition) -> None:
        self._lock = lock
        self._alive: set[threading.Thread] = set()

    def spawn(self, target: Callable[..., object], name: str, *args: object) -> None:
        """Run ``target(*args)`` on a daemon thread called ``name``; an exception it raises is logged."""
        def run() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("unexpected error in %s", name)
            finally:
                with self._lock:
                    self._alive.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:  # started under the lock: stop() never joins a thread that has not started
            self._alive.add(thread)
            thread.start()

    def join(self, deadline: float) -> None:
        """Wait until every thread but the caller's has ended, or until ``deadline`` (monotonic seconds)."""
        me = threading.current_thread()
        while True:
            with self._lock:
                alive = [t for t in self._alive if t is not me]
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                break
            alive[0].join(remaining)
        if alive:
            log.warning("board stop: %d threads still running", len(alive))
