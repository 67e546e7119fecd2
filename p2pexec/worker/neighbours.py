"""This user's other workers on this machine, and what each lends: for a warning when a worker starts.

A friend in two clusters runs two workers on one laptop, and each lends the
whole machine by default: tasks of both may then use its memory and its
GPUs at once.  While it runs, each worker keeps a small note of what it
lends, in the XDG state directory beside its history (one folder per host:
a home shared between machines must not mix theirs), locked for as long as
it runs.  A worker starting writes its own note first, then reads the
others' (:func:`~p2pexec.protocol.resources.lent_twice` says what is lent
twice), so of two that start together the later reader sees the other.  A
note nobody holds locked is left by a worker that was killed, and goes.
Workers of another user on the machine are not seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from .. import portability
from ..protocol.resources import Resources
from .history import default_path, printable

log = logging.getLogger("p2pexec.worker")

MOST = 64  # notes read at most, and their size: a start never waits on a folder someone filled
NOTE_BYTES = 64 << 10


def directory() -> Path:
    """Where this host's workers of this user keep their notes."""
    return default_path().parent / "workers" / printable(socket.gethostname(), 64).replace("/", "_")


@contextlib.contextmanager
def registered(cluster: str, resources: Resources, *, enabled: bool = True,
               where: Path | None = None) -> Iterator[dict[str, Resources]]:
    """Note what this worker lends while the block runs; yields what the others lend, by who they are.

    Not ``enabled`` (a LocalCluster's workers, which share the machine on purpose) or where files cannot
    be locked, it notes and reads nothing.
    """
    if not (enabled and portability.file_locks()):
        yield {}
        return
    where = where or directory()
    mine = where / f"{os.getpid()}.json"
    fd = _note(where, mine, json.dumps({"cluster": cluster, "res": resources.to_json()}).encode())
    try:
        yield _others(where, mine)
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                mine.unlink()
            os.close(fd)


def _note(where: Path, mine: Path, data: bytes) -> int | None:
    """Write our note, locked before it is visible; its descriptor keeps the lock while we run."""
    import fcntl  # (not at the top: Windows has none; registered() checked)

    tmp = mine.with_suffix(".tmp")
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # (a worker of our pid before us was killed while writing)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.info("other workers of yours on this machine will not see what this one lends: %s", exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
        os.replace(tmp, mine)
    except OSError as exc:
        os.close(fd)
        log.info("other workers of yours on this machine will not see what this one lends: %s", exc)
        return None
    return fd


def _others(where: Path, mine: Path) -> dict[str, Resources]:
    found: dict[str, Resources] = {}
    read = 0
    with contextlib.suppress(OSError), os.scandir(where) as entries:
        for entry in entries:
            stem, _, suffix = entry.name.partition(".")
            if suffix != "json" or not stem.isdigit() or len(stem) > 10 or entry.name == mine.name:
                continue
            if read == MOST:
                break
            read += 1
            note = _read_held(Path(entry.path))
            if note is None:
                continue
            try:
                data = json.loads(note)
                found[f"the worker for {printable(str(data['cluster']))} (pid {stem})"] = Resources.from_json(
                    data["res"])
            except (ValueError, TypeError, KeyError):
                continue  # not a note of ours
    return found


def _read_held(path: Path) -> bytes | None:
    """A note's bytes if its worker still runs (holds its lock); a note nobody holds is removed."""
    import fcntl  # (not at the top: Windows has none; registered() checked)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, NOTE_BYTES)  # held: its worker runs
        with contextlib.suppress(OSError):
            path.unlink()  # nobody holds it: its worker was killed
        return None
    except OSError:
        return None
    finally:
        os.close(fd)
