"""This user's other workers on this machine, and what each lends: for a warning when a worker starts.

A friend in two clusters runs two workers on one laptop, and each lends the
whole machine by default: tasks of both may then use its memory and its
GPUs at once.  While it runs, each worker keeps a small file saying what it
lends, in the XDG state directory beside its history; a worker starting
reads the others' (:func:`~p2pexec.protocol.resources.lent_twice` says
what is lent twice).  Workers of another user on the machine are not seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..protocol.resources import Resources
from .history import default_path, printable

log = logging.getLogger("p2pexec.worker")

MOST = 64  # files read at most: a start never waits on a directory someone filled


def directory() -> Path:
    return default_path().parent / "workers"


@contextlib.contextmanager
def registered(cluster: str, resources: Resources, where: Path | None = None) -> Iterator[dict[str, Resources]]:
    """Say what this worker lends while the block runs; yields what the others lend, by who they are."""
    where = where or directory()
    others = _others(where)
    mine = where / f"{os.getpid()}.json"
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)  # (which clusters you serve is yours to tell)
        mine.write_text(json.dumps({"cluster": cluster, "res": resources.to_json()}))
    except OSError as exc:
        log.debug("cannot note what this worker lends in %s: %s", where, exc)
    try:
        yield others
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()


def _others(where: Path) -> dict[str, Resources]:
    found: dict[str, Resources] = {}
    with contextlib.suppress(OSError):
        for path in sorted(where.glob("*.json"))[:MOST]:
            if not path.stem.isdigit() or int(path.stem) == os.getpid():
                continue
            if not _alive(int(path.stem)):
                with contextlib.suppress(OSError):
                    path.unlink()  # a worker that was killed left it
                continue
            try:
                data = json.loads(path.read_text())
                found[f"the worker for {printable(str(data['cluster']))} (pid {path.stem})"] = (
                    Resources.from_json(data["res"]))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # being written, or not ours to read
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process now: alive, though not a worker of ours (a warning too many at worst)
    return True
