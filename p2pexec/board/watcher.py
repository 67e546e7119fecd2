"""Keeping a board's users in step with its users file, without restarting it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

from ..errors import ConfigurationError
from ..keys import Keyring

log = logging.getLogger("p2pexec.board")


class Board(Protocol):
    def set_users(self, users: Keyring) -> None: ...


class UsersFileWatcher:
    """Keeps a board's users in step with its users file.

    ``start()`` polls the file's mtime, size and inode every ``interval``
    seconds and reloads it once it has stopped changing for one interval, so a
    file caught mid-write is not applied; ``reload()`` does it at once (the CLI
    calls it on SIGHUP).  A file that does not parse keeps the current users.
    """

    def __init__(self, server: Board, path: Path, interval: float = 1.0) -> None:
        self.server, self.path, self.interval = server, Path(path), interval
        self.reloads = 0  # reload() calls that finished, applied or not
        self._cond = threading.Condition()  # also serialises reload()
        self._seen = self._stamp()  # the file as the server's users were read from it
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("UsersFileWatcher.start() may be called once")
        self._thread = threading.Thread(target=self._watch, name="board-users-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the watching thread, promptly."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def reload(self) -> bool:
        """Re-read the file and apply it; False (logged, users kept) if it cannot be read."""
        with self._cond:
            stamp = self._stamp()
            try:
                users = Keyring.load(self.path)
            except ConfigurationError as exc:  # its message names the file and line
                log.error("users not reloaded, keeping the current ones: %s", exc)
                applied = False
            else:
                self.server.set_users(users)
                log.info("reloaded users from %s", self.path)
                applied = True
            self._seen = stamp  # a bad file is reported once, not every interval
            self.reloads += 1
            self._cond.notify_all()
            return applied

    def wait_reloads(self, count: int, timeout: float | None = None) -> bool:
        """Block until ``reloads >= count``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.reloads >= count, timeout)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _watch(self) -> None:
        last = self._seen
        while not self._stopped.wait(self.interval):
            stamp = self._stamp()
            with self._cond:
                changed = stamp != self._seen
            if changed and stamp == last:  # changed, then stable for an interval
                try:
                    self.reload()
                except Exception:
                    log.exception("reloading users from %s failed", self.path)
            last = stamp
