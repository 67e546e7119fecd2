"""The board's state on disk: read once at start, then saved at most a few times a second, however fast it
changes, atomically, and never losing the last change.

Two files in the board's ``state_dir``: ``clusters.json``, the access lists
(``{"owner/name": ["user", ...]}``, world-readable), and ``registry.json``,
invitations, joins and signed member lists (:class:`.Registry`, private).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..files import write_json_atomically
from ..keys import valid_username
from .commands import valid_topic
from .registry import Registry

log = logging.getLogger("p2pexec.board")


def read_state(path: Path) -> Any:
    """The JSON in ``path``, or None if there is no such file; ConfigurationError if it cannot be read."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read board state {path}: {exc}") from None


def load_members(path: Path) -> dict[str, tuple[str, ...]]:
    """The access lists saved in ``path`` (none if there is no such file); ConfigurationError if malformed."""
    data = read_state(path)
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and valid_topic(k) and isinstance(v, list)
            and all(isinstance(u, str) and valid_username(u) for u in v)
            for k, v in data.items()):
        raise ConfigurationError(
            f"board state {path} is malformed: expected {{\"owner/name\": [\"user\", ...]}}")
    return {k: tuple(v) for k, v in data.items()}


def load_registry(path: Path) -> Registry:
    """The registry saved in ``path`` (an empty one if there is no such file); ConfigurationError if malformed."""
    try:
        return Registry(read_state(path))
    except ValueError:
        raise ConfigurationError(f"board state {path} is malformed") from None


CLUSTERS = "clusters.json"  # the access lists
REGISTRY = "registry.json"  # invitations, joins and signed member lists
WRITE_INTERVAL = 0.25  # seconds between two writes of one file at the most
RETRY_AFTER = 5.0  # seconds before trying again after a failed write (a full disk, say)


class CoalescingWriter:
    """Writes ``snapshot()`` to ``path`` (atomically, fsynced) after :meth:`changed`, at most once an ``interval``.

    Changes that come while a write is pending or too recent are folded into
    the next write, which takes a fresh snapshot; :meth:`stop` writes what is
    still pending before it returns.  A failed write is logged and retried
    RETRY_AFTER seconds later, and at stop.  :meth:`flush` writes at once,
    for a change that must be on disk before the client hears it is done.
    """

    def __init__(self, path: Path, snapshot: Callable[[], Any], *, mode: int = 0o600,
                 interval: float = WRITE_INTERVAL) -> None:
        self.path, self.mode, self.interval = path, mode, interval
        self.writes = 0  # files written, for tests and status
        self._snapshot = snapshot
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  # one snapshot-and-write at a time: the last one holds every change
        self._dirty = self._stopping = False
        self._last = -float("inf")  # monotonic time of the last write
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"board-save-{self.path.name}", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """The state changed: save it soon (never blocks on the disk)."""
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def flush(self) -> bool:
        """Write any pending change now (blocks on the disk); False if that failed (it is retried later)."""
        return self._write_if_dirty()

    def stop(self) -> None:
        """Write any pending change, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._write_if_dirty()  # never started, or a last change after the thread ended

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                wait = self._last + self.interval - time.monotonic()
                if not self._dirty or wait > 0:
                    self._cond.wait(wait if self._dirty else None)
                    continue
                self._cond.release()
                try:
                    self._write_if_dirty()
                finally:
                    self._cond.acquire()

    def _write_if_dirty(self) -> bool:
        with self._write_lock:
            with self._cond:
                if not self._dirty:
                    return True
                self._dirty = False
                self._last = time.monotonic()
            try:
                write_json_atomically(self.path, self._snapshot(), mode=self.mode)
            except OSError as exc:
                log.error("cannot save board state %s (trying again in %g s): %s", self.path, RETRY_AFTER, exc)
                with self._cond:
                    self._dirty = True
                    self._last = time.monotonic() + RETRY_AFTER - self.interval
                    self._cond.notify_all()
                return False
            with self._cond:
                self.writes += 1
            return True


class StateFiles:
    """The writers of the board's two state files in ``state_dir``, one thread each."""

    def __init__(self, state_dir: Path, members: Callable[[], Any], registry: Callable[[], Any]) -> None:
        self.clusters = CoalescingWriter(state_dir / CLUSTERS, members, mode=0o644)
        self.registry = CoalescingWriter(state_dir / REGISTRY, registry)

    def start(self) -> None:
        self.clusters.start()
        self.registry.start()

    def stop(self) -> None:
        """Save what is pending, then end the threads (started or not)."""
        self.clusters.stop()
        self.registry.stop()
