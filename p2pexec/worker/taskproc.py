"""The task process: the only place on a worker where task payloads are unpickled.

Started by the worker daemon as ``python -m p2pexec.worker.taskproc``; it
says it is ready with an empty frame, then reads length-prefixed task
payloads on stdin and answers each with a length-prefixed outcome on stdout.  File descriptors 0-2 are pointed away
from the protocol pipes at start, so a task that prints, or a C library
that writes to fd 1, cannot corrupt the protocol; whatever a task writes to
fd 1 or 2 is captured and sent back with its outcome.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import tempfile

from ..protocol.frames import TASK_LENGTH

SMALL = 1 << 16
from ..tasks import dump_outcome, load_task


def _read_exact(fd: int, n: int) -> bytearray | None:
    buf = bytearray(n)  # filled in place: a big task is held once, not in pieces and again joined
    view, got = memoryview(buf), 0
    while got < n:
        count = os.readv(fd, [view[got : got + (1 << 20)]])
        if not count:
            return None
        got += count
    return buf


def _write_all(fd: int, *parts: bytes | memoryview) -> None:
    """One write for small messages (one wake-up of the daemon), no joined copy for large ones."""
    if sum(memoryview(p).nbytes for p in parts) <= SMALL:
        parts = (b"".join(parts),)
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            view = view[os.write(fd, view) :]


class _Capture:
    """Captures Python-level and fd-level output of one task at a time."""

    def __init__(self) -> None:
        self._files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
        for fd, f in self._files.items():
            os.dup2(f.fileno(), fd)

    def start(self) -> tuple[io.StringIO, io.StringIO]:
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return sys.stdout, sys.stderr

    def collect(self, out: io.StringIO, err: io.StringIO) -> tuple[str, str]:
        texts = []
        for fd, buf in ((1, out), (2, err)):
            f = self._files[fd]
            size = os.lseek(fd, 0, os.SEEK_CUR)
            raw = b""
            if size:
                os.lseek(fd, 0, os.SEEK_SET)
                raw = _read_exact(f.fileno(), size) or b""
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            texts.append(raw.decode(errors="replace") + buf.getvalue())
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        return texts[0], texts[1]


def serve(proto_in: int, proto_out: int) -> None:
    capture = _Capture()
    _write_all(proto_out, TASK_LENGTH.pack(0))  # ready: imports done
    while True:
        header = _read_exact(proto_in, TASK_LENGTH.size)
        if header is None:
            return
        (n,) = TASK_LENGTH.unpack(header)
        payload = _read_exact(proto_in, n)
        if payload is None:
            return
        out, err = capture.start()
        try:
            fn, args, kwargs = load_task(payload)
            del payload
            ok, value = True, fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - a task's SystemExit is its result too
            ok, value = False, exc
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        stdout, stderr = capture.collect(out, err)
        parts = dump_outcome(ok, value, stdout, stderr)
        del value
        _write_all(proto_out, TASK_LENGTH.pack(sum(memoryview(p).nbytes for p in parts)), *parts)
        del parts


def main() -> None:
    # Ctrl-C in the worker's terminal is for the daemon, which ends us itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep private copies of the protocol pipes, then point 0 at /dev/null.
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    sys.stdin = open(os.devnull)
    serve(proto_in, proto_out)


if __name__ == "__main__":
    main()
