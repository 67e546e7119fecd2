"""The task process: the only place on a worker where task payloads are unpickled.

Started by the worker daemon as ``python -m p2pexec.worker.taskproc FD``,
FD being its end of the hop socket (:mod:`.hop`); it says it is ready with
an empty message, then answers each task with its outcome.  File
descriptors 0-2 point away from the hop, so a task that prints, or a C
library that writes to fd 1, cannot corrupt the protocol; whatever a task
writes to fd 1 or 2 is captured and sent back with its outcome.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from functools import partial
from typing import Any

from .. import portability
from ..chunks import mapped_function, run_chunks
from ..namespaces import Initialized
from ..protocol.frames import ALIGN, nbytes
from ..protocol.values import VALUE_AT
from ..task_logs import record_here
from ..tasks import dump_outcome, load_task
from .hop import (HEADER, INLINE, LIMIT, OUTPUT_KEPT, RELEASED, REPORT, SHARED, SHARED_MIN, SKIP, VALUE,
                  Outcomes, dropped_note, kept_output, map_payload, shared)
from .privileges import prctl
from .sandbox import LANDLOCK_ENV


class _Kept(io.TextIOBase):
    """What a task prints to ``sys.stdout`` or ``sys.stderr``: its start goes to the file at ``fd`` (line by
    line, so the daemon has it if the process dies), then only its end is kept, in memory.  Held whole, a
    task logging its progress went over its memory limit (its output counts) and was killed after doing all
    its work; and the client would have held it all too."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[str] = []  # of the start, not written yet (no end of line since)
        self._tail = io.StringIO()
        self._room = OUTPUT_KEPT  # characters the start still takes
        self.dropped = 0  # characters between the start and the end, gone

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        rest = text
        if self._room:
            head, rest = rest[:self._room], rest[self._room:]
            self._room -= len(head)
            self._pending.append(head)
            if "\n" in head or not self._room:
                self.flush()
        if rest and self._tail.write(rest) and self._tail.tell() > 2 * OUTPUT_KEPT:  # keep the last OUTPUT_KEPT
            self.dropped += self._tail.tell() - OUTPUT_KEPT  # (cut seldom: each cut is a copy)
            self._tail = io.StringIO(self._tail.getvalue()[-OUTPUT_KEPT:])
            self._tail.seek(0, io.SEEK_END)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            data = memoryview("".join(self._pending).encode(errors="backslashreplace"))
            self._pending.clear()
            while data:
                data = data[os.write(self._fd, data):]

    def end(self) -> str:
        """What did not go to the file: the end, after a note of what was dropped before it."""
        tail = self._tail.getvalue()
        over = max(0, len(tail) - OUTPUT_KEPT)
        dropped = self.dropped + over
        return (dropped_note(dropped) if dropped else "") + tail[over:]


class _Capture:
    """Captures Python-level and fd-level output of one task at a time, in the files the daemon gave as fd 1
    and 2."""

    def start(self) -> tuple[_Kept, _Kept]:
        sys.stdout, sys.stderr = _Kept(1), _Kept(2)
        return sys.stdout, sys.stderr

    def collect(self, out: _Kept, err: _Kept) -> tuple[str, str]:
        texts = []
        for fd, buf in ((1, out), (2, err)):
            buf.flush()
            text = ""
            if os.lseek(fd, 0, os.SEEK_CUR):  # (one system call when nothing was written: most tasks)
                text = kept_output(fd)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            texts.append(text + buf.end())
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        return texts[0], texts[1]


_memory_limit = 0  # the address space this process allows itself now (0: its hard limit)
OVER_MEMORY_EXIT = 3
DAEMON_GONE_EXIT = 4  # (nobody sees it: the daemon is gone)
_PR_SET_PDEATHSIG = 1


def _limit_memory(size: int) -> None:
    """Lower (or raise, up to the hard limit the daemon set) what this process may map from now on."""
    global _memory_limit
    import resource

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = hard if size == 0 or (hard != resource.RLIM_INFINITY and size > hard) else size
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    _memory_limit = 0 if soft == hard else soft


Data = bytearray | memoryview


WATCH_SECONDS = 0.01  # while a task runs, the inbox's thread looks for SKIPs this often
IDLE_SECONDS = 0.25  # and this often whether a task runs
_sending = threading.Lock()  # the hop is written by the task's thread and by the inbox's


class _Inbox:
    """What the daemon sends.  The task's thread reads it between tasks; while a task runs, a thread of the
    inbox's own looks every :data:`WATCH_SECONDS` for what came meanwhile, so that a SKIP for a task not
    started yet is answered without waiting for the task that runs: the daemon cancels it or hands it back.

    That thread also lets the last big outcome's memory go when it is not used (:class:`.hop.Outcomes`).

    Nothing wakes that thread when a task starts (it looks every :data:`IDLE_SECONDS` whether one runs):
    waking it for each task cost a lone task's round trip ~0.3 ms, its wake-up competing for the GIL with
    the task's thread."""

    def __init__(self, sock: socket.socket, outcomes: Outcomes) -> None:
        self.sock = sock
        self.outcomes = outcomes
        self.lock = threading.Lock()  # guards what follows (not the socket)
        self.reading = threading.Lock()  # held by whichever thread reads a message off the hop
        self.waiting: deque[tuple[int, int, Data]] = deque()  # read, not yet taken: (kind, number, data)
        self.tasks = 0  # tasks read so far: a SKIP names one by its number among them
        self.skipped: set[int] = set()
        self.running = False
        self.closed = False
        self.ended = False  # the daemon ended the hop (not: the task broke it here)
        threading.Thread(target=self._watch, name="p2pexec-inbox", daemon=True).start()

    def next_task(self) -> tuple[Data, list[Data]] | None:
        """The next task not skipped, with its values; None once the daemon is gone.  Applies the LIMITs
        before it."""
        values: list[Data] = []
        with self.lock:
            self.running = False
        while True:
            with self.lock:
                item = self.waiting.popleft() if self.waiting else None
                if item is not None and item[0] in (INLINE, SHARED) and item[1] not in self.skipped:
                    self.running = True
                    return item[2], values
                closed = self.closed
            if item is None:
                if closed:
                    return None
                with self.reading:
                    with self.lock:
                        empty = not self.waiting
                    if empty:
                        self._read()
            elif item[0] == VALUE:
                values.append(item[2])
            elif item[0] == LIMIT:
                _limit_memory(item[1])
            else:
                values = []  # a task skipped (answered when it was) and its values

    def _read(self) -> None:
        """One message off the hop (the caller holds ``reading``); a SKIP of a task still waiting is
        answered here."""
        message = _receive_one(self.sock)
        if message is not None and message[0] == RELEASED:
            self.outcomes.released(message[1])  # (outside the lock: it waits for an outcome being written)
            return
        with self.lock:
            if message is None:
                self.closed = self.ended = True
                return
            kind, number, data = message
            if kind == SKIP:
                if number in self.skipped or not any(k in (INLINE, SHARED) and n == number
                                                     for k, n, _ in self.waiting):
                    return  # started (or answered) already: it answers as usual
                self.skipped.add(number)
            elif kind in (INLINE, SHARED):
                self.waiting.append((kind, self.tasks, data))
                self.tasks += 1
                return
            else:
                self.waiting.append(message)
                return
        _say(self.sock, _report({"skipped": number}))

    def _watch(self) -> None:
        try:
            while not self.closed:
                time.sleep(WATCH_SECONDS if self.running else IDLE_SECONDS)
                self.outcomes.expire()
                if not self.running or not self.reading.acquire(blocking=False):
                    continue  # no task runs, or the task's thread reads: it ended
                try:
                    while not self.closed and select.select([self.sock], [], [], 0)[0]:
                        self._read()
                finally:
                    self.reading.release()
        except Exception:  # noqa: BLE001 - the hop broke, or a payload did not fit: no more tasks
            with self.lock:
                self.closed = True
        if self.running and self.ended:  # the daemon is gone (killed): nobody waits for this task, which runs
            os._exit(DAEMON_GONE_EXIT)  # elsewhere now


def _receive_one(sock: socket.socket) -> tuple[int, int, Data] | None:
    """One message: its kind, the number a LIMIT (``size``) or a SKIP (``offset``) carries, and its data (a
    private mapping of a shared memfd, or the bytes that followed)."""
    if portability.fd_passing():
        data, fds, _, _ = socket.recv_fds(sock, HEADER.size, 1)
    else:  # the daemon sends no memfds here: every payload comes inline
        data, fds = sock.recv(HEADER.size), []
    try:
        header = bytearray(data)
        while data and len(header) < HEADER.size:
            data = sock.recv(HEADER.size - len(header))
            header += data
        if not data:
            return None
        kind, offset, size = HEADER.unpack(header)
        if kind in (LIMIT, SKIP, RELEASED) and not fds:
            return kind, size if kind == LIMIT else offset, bytearray()
        if kind in (SHARED, VALUE) and len(fds) == 1:
            return kind, 0, map_payload(fds[0], offset, size)
        # filled in place: a big task is held once, not in pieces and again joined; a value where its arrays
        # land aligned, as they would in shared memory
        payload = view = _landing(size, VALUE_AT) if kind == VALUE else memoryview(bytearray(size))
        while view:
            count = sock.recv_into(view)
            if not count:
                return None
            view = view[count:]
        return kind, 0, payload
    finally:
        for fd in fds:
            os.close(fd)


def _landing(size: int, at: int) -> memoryview:
    """``size`` writable bytes starting ``at`` bytes past an ALIGN boundary."""
    memory = bytearray(size + ALIGN)
    skip = (at - ctypes.addressof(ctypes.c_char.from_buffer(memory))) % ALIGN
    return memoryview(memory)[skip : skip + size]


def _runs_chunks(fn: object) -> bool:
    """Is ``fn`` (maybe behind its executor's initializer) a map's :func:`~p2pexec.chunks.run_chunks`?"""
    if isinstance(fn, Initialized):
        fn = fn.fn
    return isinstance(fn, partial) and fn.func is run_chunks


def function_name(fn: object) -> str:
    """``module.qualname`` of a task's function, for the worker's history; a map's chunk names what it maps."""
    fn = mapped_function(fn)
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(named, '__module__', None) or '?'}.{getattr(named, '__qualname__', '?')}"[:150]


def _report(fields: dict) -> bytes:
    data = json.dumps(fields, ensure_ascii=True).encode()  # a name of 150 characters fits in MAX_REPORT
    return HEADER.pack(REPORT, 0, len(data)) + data


def _say(sock: socket.socket, data: bytes) -> None:
    """Write one whole message to the daemon (the inbox's thread may write a notice meanwhile)."""
    with _sending:
        sock.sendall(data)


def _tell_name(sock: socket.socket, name: str, reported: str | None) -> str:
    if name != reported:
        _say(sock, _report({"fn": name}))
    return name


def _send(sock: socket.socket, outcomes: Outcomes, parts: list, report: bytes = b"") -> None:
    """The outcome, after ``report`` if any: through shared memory when big, else inline in one write."""
    size = sum(nbytes(p) for p in parts)
    if size >= SHARED_MIN and shared():
        try:
            fd = outcomes.share(parts, size)
        except OSError:
            pass  # no memfd here: inline it is
        else:
            try:
                with _sending:
                    if report:
                        sock.sendall(report)
                    socket.send_fds(sock, [HEADER.pack(SHARED, 0, size)], [fd])
            finally:
                os.close(fd)
            return
    _say(sock, b"".join([report, HEADER.pack(INLINE, 0, size), *parts]))


def serve(sock: socket.socket) -> None:
    capture, recorder = _Capture(), record_here()
    sock.sendall(HEADER.pack(INLINE, 0, 0))  # ready: imports done
    reported = None  # the function name the daemon has: said again only when it changes (maps cost nothing)
    outcomes = Outcomes()
    inbox = _Inbox(sock, outcomes)
    while True:
        received = inbox.next_task()
        if received is None:
            return
        payload, values = received
        del received
        out, err = capture.start()
        name = "?"  # what the history says of a task that cannot even be loaded
        fn: Any = None
        args: Any = ()
        kwargs: Any = {}
        try:
            try:
                fn, args, kwargs = load_task(payload, values)
            finally:
                del payload, values  # (loaded or not, the task's payload goes: not held while it runs)
            name = function_name(fn)
            reported = _tell_name(sock, name, reported)  # before it runs: a task that kills its process is named
            ok, value = True, fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - a task's SystemExit is its result too
            if isinstance(exc, MemoryError) and _memory_limit:  # stopped: the daemon says which limit
                _say(sock, _report({"over": "memory"}))
                os._exit(OVER_MEMORY_EXIT)
            ok, value = False, exc
            if name == "?" and isinstance(exc, ModuleNotFoundError) and exc.name:  # not installed here
                _say(sock, _report({"fn": name, "missing": exc.name.partition(".")[0]}))
                reported = name
        reported = _tell_name(sock, name, reported)  # said already, unless loading failed
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        stdout, stderr = capture.collect(out, err)
        parts = dump_outcome(ok, value, stdout, stderr, recorder.take(), by_chunk=ok and _runs_chunks(fn))
        del value, fn, args, kwargs  # (as in a ProcessPoolExecutor's worker: not held while the next is awaited)
        _send(sock, outcomes, parts, b"" if ok else _report({"ok": False}))
        del parts


def main() -> None:
    # Ctrl-C in the worker's terminal is for the daemon, which ends us itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A killed daemon takes us with it, even in the middle of a task that holds the GIL (the inbox's thread
    # notices its end otherwise).  It started us from the thread that runs it (spawn.py), which the signal
    # is tied to.
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    sys.stdin = open(os.devnull)
    confine = os.environ.pop(LANDLOCK_ENV, None)
    if confine is not None:  # before the first task is read: nothing untrusted has run yet
        from .landlock import restrict
        from .privileges import drop_capabilities
        from .seccomp import deny_unix_sockets

        drop_capabilities()
        rules = json.loads(confine)
        restrict(rules["read"], rules["write"], rules["network"])
        deny_unix_sockets()  # (Landlock does not cover connecting to one by its path)
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
