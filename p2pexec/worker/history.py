"""What ran on this worker: a small append-only record that the friend reads with ``p2pexec-worker --history``.

One JSON object per line in ``$XDG_STATE_HOME/p2pexec/worker-history.jsonl``
(``~/.local/state/...`` by default): who sent the task, the function's
name, when it started, how long it ran, and how it ended (``ok``,
``failed``: it raised, ``killed``: its process died or was stopped).

The function name is what the client's code reported from inside its task
process (the daemon never unpickles a task), so a hostile member can make
it say anything: it tells the friend what members *say* they ran, not
what they did.  It is stripped of control characters before it is stored.

The file stays small: past :data:`MAX_BYTES` it is trimmed in place to its
newest :data:`KEEP_BYTES`, under an exclusive lock (where the platform
has ``flock``), so several workers on one machine may share it.  Writing is batched, and a failure to write
costs the record, never the worker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import portability

log = logging.getLogger("p2pexec.worker")

FILE_NAME = "worker-history.jsonl"
MAX_BYTES = 1 << 20  # about 8,000 entries
KEEP_BYTES = MAX_BYTES // 2
FLUSH_EVERY = 1.0  # seconds a record may wait in memory
FLUSH_AT = 256  # records that make a write at once
OUTCOMES = ("ok", "failed", "killed")
MAX_NAME = 200


def default_path() -> Path:
    """Where this user's workers keep their history (XDG state directory)."""
    base = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return Path(base).expanduser() / "p2pexec" / FILE_NAME


def printable(text: str, limit: int = MAX_NAME) -> str:
    """``text`` safe for a log or a terminal: no control or escape characters, bounded length."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


@dataclass(frozen=True)
class Entry:
    member: str
    function: str
    start: float  # Unix time
    seconds: float
    outcome: str  # one of OUTCOMES
    cluster: str = ""

    def to_line(self) -> bytes:
        # (a dict by hand: dataclasses.asdict deep-copies, and this runs once per task on the daemon's loop)
        fields = {"member": self.member, "function": self.function, "start": round(self.start, 3),
                  "seconds": round(self.seconds, 6), "outcome": self.outcome, "cluster": self.cluster}
        return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> "Entry | None":
        """The entry on ``line``; None for a line that is not one (torn by a crash, edited by hand)."""
        try:
            fields = json.loads(line)
            entry = cls(member=str(fields["member"]), function=str(fields["function"]),
                        start=float(fields["start"]), seconds=float(fields["seconds"]),
                        outcome=str(fields["outcome"]), cluster=str(fields.get("cluster", "")))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None
        if entry.outcome not in OUTCOMES or not (math.isfinite(entry.start) and math.isfinite(entry.seconds)):
            return None
        return entry


def _lock(fd: int) -> None:
    """Lock ``fd`` exclusively until it is closed, where ``flock`` exists.

    Without it (Windows, ``P2PEXEC_PORTABLE=1``) nothing is locked: each
    batch is still one ``O_APPEND`` write, but a batch appended by another
    worker on this machine while one trims may be lost.
    """
    if portability.file_locks():
        import fcntl  # not at the top: Windows has none

        fcntl.flock(fd, fcntl.LOCK_EX)


def trim(data: bytes, keep: int) -> bytes:
    """The newest whole lines of ``data`` that fit in ``keep`` bytes (a torn last line counts as one)."""
    if len(data) <= keep:
        return data
    cut = data.find(b"\n", len(data) - keep - 1)  # the newline that ends the last line we drop
    return data[cut + 1:] if cut != -1 else b""


class History:
    """The history file of one machine's workers: batched appends, bounded size, newest entries on demand."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, keep_bytes: int = KEEP_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep_bytes = keep_bytes
        self._pending: list[Entry] = []
        self._flushed_at = time.monotonic()
        self._failed = False

    def add(self, entry: Entry) -> None:
        """Record ``entry``; written at once if records have waited long enough, else with a later one."""
        self._pending.append(entry)
        if len(self._pending) >= FLUSH_AT or time.monotonic() - self._flushed_at >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        entries, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        if not entries:
            return
        try:
            self.append(entries)
        except OSError as exc:
            if not self._failed:  # say it once: the friend can fix the directory, tasks keep running meanwhile
                log.warning("cannot record what ran in %s (%s); tasks run on unrecorded", self.path, exc)
            self._failed = True
        else:
            self._failed = False

    def append(self, entries: Iterable[Entry]) -> None:
        """Append under an exclusive lock; trim in place (same file, so other writers keep appending to it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _lock(fd)
            os.write(fd, b"".join(entry.to_line() for entry in entries))
            size = os.fstat(fd).st_size
            if size > self.max_bytes:
                kept = trim(os.pread(fd, size, 0), self.keep_bytes)
                os.ftruncate(fd, 0)
                os.write(fd, kept)  # O_APPEND: written at the new end, which is 0
        finally:
            os.close(fd)  # releases the lock

    def recent(self, count: int) -> list[Entry]:
        """The newest ``count`` entries, oldest first; none if there is no file yet."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - self.max_bytes - (1 << 16)))
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        entries = [e for e in map(Entry.from_line, lines) if e is not None]
        return entries[-count:] if count > 0 else []


def format_table(entries: list[Entry]) -> str:
    """A table for a terminal, newest last; every field a member sent is made printable."""
    if not entries:
        return "nothing has run on this machine's workers yet"
    rows = [("started", "member", "function", "seconds", "outcome")]
    rows += [(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.start)), printable(e.member, 32),
              printable(e.function, 60), f"{e.seconds:.3f}", printable(e.outcome, 8)) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
