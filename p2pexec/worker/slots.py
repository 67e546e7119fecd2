"""Execution slots: each one a long-lived task process driven from trio, over the hop of :mod:`.hop`."""

from __future__ import annotations

import array
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO

import trio

from .. import portability
from ..protocol.frames import Buffer, nbytes
from ..protocol.resources import format_size
from ..transport.eager_locks import EagerLock
from .hop import (HEADER, INLINE, LIMIT, MAX_REPORT, REPORT, SHARED, SKIP, VALUE, Releases, Report, kept_output,
                  map_outcome)
from .history import printable
from .hop_reader import HopBroken, HopReader, close, nonblocking_call, send_all
from .privileges import prctl
from .sandbox import SLOT_ENV, Sandbox
from .spawn import Child, start_child
from .valuecache import Blob

log = logging.getLogger("p2pexec.worker")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
EXIT_SECONDS = 5.0  # a task process whose hop closed has this long to exit on its own


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "vanished"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class TaskProcessDied(Exception):
    """The task process ended while running a task, or broke the hop; its message says how, ``output`` what
    the task had printed to stdout and stderr."""

    def __init__(self, message: str, output: tuple[str, str] = ("", "")) -> None:
        super().__init__(message)
        self.output = output


class TaskSlot:
    """Runs one task at a time in its own process (sandboxed where the machine allows), restarting it
    after a crash."""

    def __init__(self, index: int, sandbox: Sandbox = Sandbox(None), scratch_root: Path | None = None) -> None:
        self.index = index
        self.sandbox = sandbox
        self._scratch_root = scratch_root
        self._proc: Child | None = None
        self._sock: socket.socket | None = None  # the hop (non-blocking: hop_reader.nonblocking_call)
        self._reader: HopReader | None = None  # reads what the socket brings
        self._scratch: Path | None = None  # the process's HOME, TMPDIR and working directory
        self._output: list[IO[bytes]] = []  # its fd 1 and 2: files only this daemon can still name
        self.member: str | None = None  # whose code the current process has run
        self.function = "?"  # the function its current task runs, as the task process reported it (untrusted)
        self.raised = False  # the task process reported that its last task raised
        self.env: dict[str, str] = {}  # for its task processes on top of the daemon's (GPUs, current_worker)
        self.limit: int | None = None  # the address space its tasks get now (None: the hard limit), per lease
        self._applied: int | None = None  # the limit its process has been told
        self._releases = Releases()  # its shared outcomes, and those let go of (hop.Releases)
        self._over: str | None = None  # the limit the running task went past, as the task process reported
        self.missing: str | None = None  # the module its last task could not be loaded without (reported)
        self.on_skipped: Callable[[int], None] = _ignore  # told the number of each task skipped (:meth:`skip`)
        self.taken = 0  # tasks handed to the current process (0: none): a SKIP names one by its number
        self._outstanding = 0  # of those, not answered or skipped yet
        self._skipping: set[int] = set()  # asked to be skipped, not yet confirmed
        self._writing = EagerLock()  # a SKIP must not land inside a task being written

    async def assign(self, member: str, recycle: int | None = None) -> None:
        """Serve ``member`` next, in a process no other member's task has run in, nor ``recycle`` tasks yet.

        A task can change its process for good (patch modules, start
        threads); a process is therefore never shared between members, only
        reused for the same member's next lease.
        """
        if self.member not in (None, member) or (recycle is not None and self.taken >= recycle):
            await self.stop()  # the next task starts a fresh process
        self.member = member

    async def start(self) -> None:
        self._scratch = Path(tempfile.mkdtemp(prefix=f"slot{self.index}-", dir=self._scratch_root))
        env = self.sandbox.environment(os.environ, self._scratch, _PACKAGE_ROOT, self.index)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        env.update(self.env)
        self._applied, self._releases = None, Releases()
        self._output = [tempfile.TemporaryFile(dir=self._scratch) for _ in range(2)]  # its fd 1 and 2
        ours, theirs = socket.socketpair()  # AF_UNIX where there is one
        info_read, info_write = os.pipe() if self.sandbox.processes is not None else (None, None)
        argv = self.sandbox.command([sys.executable, "-m", "p2pexec.worker.taskproc", str(theirs.fileno())],
                                    self._scratch, _PACKAGE_ROOT, info_fd=info_write)
        try:
            proc = start_child(  # (from this thread: see spawn.py)
                argv, stdin=subprocess.DEVNULL, stdout=self._output[0], stderr=self._output[1], env=env,
                cwd=self._scratch,
                pass_fds=[fd for fd in (theirs.fileno(), info_write) if fd is not None],
                preexec_fn=self.sandbox.limits(),
            )
        except BaseException:
            ours.close()
            if info_read is not None:
                os.close(info_read)
            self._forget()
            raise
        finally:
            theirs.close()
            if info_write is not None:
                os.close(info_write)
        self._proc, self._sock = proc, ours
        self._reader = HopReader(ours, portability.fd_passing())
        self.function, self.taken, self._outstanding, self._skipping = "?", 0, 1, set()  # (1: its ready)
        _LIVE.add(proc.pid)
        try:
            ready = await self._receive_outcome()
            if ready is None or nbytes(ready) != 0:
                raise await self._end("a new task process sent data instead of its ready signal")
            if info_read is not None:  # once the sandbox is set up, before the first task: nothing untrusted yet
                info_fd, info_read = info_read, None  # (cap_processes closes it)
                try:
                    await cap_processes(self.sandbox, info_fd)
                except (ValueError, KeyError, OSError, trio.TooSlowError) as exc:
                    raise await self._end(f"could not cap its processes ({exc!r})") from None
        except TaskProcessDied as exc:
            raise TaskProcessDied(f"a new task process failed while starting: {exc}", exc.output) from None
        finally:
            if info_read is not None:
                os.close(info_read)

    async def submit(self, tasks: Sequence[tuple[Buffer, tuple[int, int] | None, Sequence[Blob]]]) -> list[int]:
        """Hand ``tasks`` to the task process, which runs them in order, answering each (:meth:`outcome`);
        returns their numbers, for :meth:`skip`.  ``tasks`` are (payload, shared, values): ``shared`` is
        (memfd, offset) when the payload lies in shared memory; ``values`` are the big values it refers to
        (each task process maps them afresh: its own copy to write into).  Small ones go in one write: the
        task process finds the next waiting when it is done with one, with no wake-up of either side between.
        """
        if self._proc is None or self._proc.returncode is not None:
            await self.start()
        first, self.taken = self.taken, self.taken + len(tasks)
        self._outstanding += len(tasks)
        async with _Hop(self), self._writing:
            inline = bytearray(self._releases.notices())  # (its memory for outcomes, written again)
            if self.limit != self._applied:
                inline += HEADER.pack(LIMIT, 0, self.limit or 0)
                self._applied = self.limit
            for payload, shared, values in tasks:
                size = nbytes(payload)
                if shared is None and not values and size <= 1 << 16:
                    inline += HEADER.pack(INLINE, 0, size)
                    inline += payload
                    continue
                if inline:
                    await self._send_all(inline)
                    inline = bytearray()
                for value in values:
                    if value.shared is not None:
                        fd, offset = value.shared
                        await self._send_with_fd(HEADER.pack(VALUE, offset, value.data.nbytes), fd)
                    else:
                        await self._send_all(HEADER.pack(VALUE, 0, value.data.nbytes))
                        await self._send_all(value.data)
                if shared is not None:
                    fd, offset = shared
                    await self._send_with_fd(HEADER.pack(SHARED, offset, size), fd)
                else:
                    await self._send_all(HEADER.pack(INLINE, 0, size))
                    await self._send_all(payload)
            if inline:
                await self._send_all(inline)
        return list(range(first, first + len(tasks)))

    async def skip(self, number: int) -> None:
        """Withdraw task ``number`` of the current process unless it has started: if it had not, the task
        process says so at once (:attr:`on_skipped`, while an outcome is awaited), else it answers as usual."""
        if self._sock is None:
            return  # the process is gone: nothing of it runs
        self._skipping.add(number)
        async with self._writing:
            try:
                await self._send_all(HEADER.pack(SKIP, number, 0))
            except OSError:
                pass  # it died: the task waiting for its outcome hears of it

    async def outcome(self) -> Buffer | None:
        """The outcome of the next task submitted and not skipped (its reports in :attr:`raised`,
        :attr:`missing`), None if none is left, or TaskProcessDied."""
        self.raised, self._over, self.missing = False, None, None
        async with _Hop(self):
            return await self._receive_outcome()

    # -- the hop ------------------------------------------------------------------------
    async def _send_all(self, data: Buffer) -> None:
        assert self._sock is not None
        await send_all(self._sock, data)

    async def _send_with_fd(self, header: bytes, fd: int) -> None:
        sock = self._sock
        assert sock is not None
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        sent = await nonblocking_call(sock, lambda: sock.sendmsg([header], rights), writing=True)
        await self._send_all(header[sent:])

    async def _receive_outcome(self) -> Buffer | None:
        """The next outcome from the task process: inline bytes, or a view of its shared memory (a memfd
        sealed against resizing, :class:`.hop.Releases` says when it is let go);
        None once every task handed over is answered or skipped.

        REPORT messages come before an outcome (the function's name, a
        module it could not load, whether it raised: two at most) or
        whenever a task is skipped; anything else is a broken hop.
        """
        assert self._reader is not None
        reports = 0
        while self._outstanding:
            try:
                got = await self._reader.header()
            except HopBroken as exc:
                raise await self._end(str(exc)) from None
            if got is None:
                raise await self._end(None)
            (kind, offset, size), fds = got
            try:
                if kind == REPORT and not fds and reports < 2 and size <= MAX_REPORT:
                    report = bytearray(size)
                    await self._receive_into(memoryview(report))
                    outstanding = self._outstanding
                    if not self._take_report(report):
                        raise await self._end("the task process claimed to skip a task it was not asked to")
                    reports += self._outstanding == outstanding  # (a skipped task's notice is not one of them)
                    continue
                self._outstanding -= 1
                if kind == SHARED and len(fds) == 1:
                    try:
                        return self._releases.track(map_outcome(fds[0], offset, size))
                    except (ValueError, OSError) as exc:
                        raise await self._end(f"the task process sent an unusable shared outcome: {exc}") from None
                if kind != INLINE or fds:
                    raise await self._end("the task process broke the hop protocol")
                try:
                    outcome = bytearray(size)
                except (MemoryError, OverflowError):
                    raise await self._end(f"the task's outcome ({size} bytes) does not fit in this worker's "
                                          f"memory") from None
                await self._receive_into(memoryview(outcome))
                return outcome
            finally:
                for fd in fds:
                    os.close(fd)
        return None

    def _take_report(self, data: bytearray) -> bool:
        """What the task process says about its task; False if it claims to have skipped a task it was not
        asked to skip."""
        report = Report.parse(data)
        if report.skipped is not None:  # a notice, not about the task that runs
            if report.skipped not in self._skipping:
                return False
            self._skipping.discard(report.skipped)
            self._outstanding -= 1
            self.on_skipped(report.skipped)
            return True
        self.function = printable(report.fn) if report.fn is not None else self.function
        self.raised = self.raised or report.raised
        self.missing = report.missing or self.missing
        if report.over_memory:
            self._over = f"the task went past its memory limit of {format_size(self._applied or 0)} and was stopped"
        return True

    async def _receive_into(self, view: memoryview) -> None:
        assert self._reader is not None
        try:
            if await self._reader.body(view):
                return
        except HopBroken as exc:
            raise await self._end(str(exc)) from None
        raise await self._end(None)

    async def _end(self, why: str | None) -> TaskProcessDied:
        """End the process; the error to raise says ``why``, or how the process ended, and what it printed."""
        proc, files, self._output = self._proc, self._output, []
        self._forget()
        if proc is not None:
            if why is not None:
                proc.kill()
            with trio.move_on_after(EXIT_SECONDS):
                await proc.wait()
            if proc.returncode is None:  # (not an outside SIGKILL, as its exit status would then say)
                why = why or (f"the task process closed its link to the worker but did not exit within "
                              f"{EXIT_SECONDS:g} s, so the worker killed it")
                proc.kill()
                await proc.wait()
            self._left_behind(proc)
        output = ("", "")
        if files:
            output = (kept_output(files[0].fileno()), kept_output(files[1].fileno()))
            for file in files:
                file.close()
        return TaskProcessDied(why or self._over or
                               f"the task process {describe_exit(proc.returncode if proc else None)}", output)

    def _forget(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            close(self._sock)
        if self._scratch is not None:  # what the last process left goes with it
            shutil.rmtree(self._scratch, ignore_errors=True)
        for file in self._output:
            file.close()
        self._output, self.taken, self._proc, self._sock, self._reader, self._scratch = [], 0, None, None, None, None

    async def retire(self, replace: bool = False) -> None:
        """End the process as a pool's worker after ``max_tasks_per_child``: its hop closes, it exits (``atexit``
        handlers run), killed after EXIT_SECONDS or as its lease ends; with ``replace``, a fresh one starts."""
        try:
            if self._proc is not None and self._sock is not None:
                close(self._sock)
                with trio.move_on_after(EXIT_SECONDS):
                    await self._proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()
        if replace:
            with suppress(TaskProcessDied):  # the next task tries again, and fails saying why
                await self.start()

    async def stop(self) -> None:
        proc = self._proc
        self._forget()
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(EXIT_SECONDS):
            await proc.wait()
        self._left_behind(proc)

    def _left_behind(self, proc: Child) -> None:
        """Kill what the ended task process started (it was reparented to us, a child subreaper)."""
        _LIVE.discard(proc.pid)
        if self.sandbox.layer != "bubblewrap" and _subreaper:  # (bubblewrap's PID namespace ends them itself)
            reap_orphans(self.index)


async def cap_processes(sandbox: Sandbox, info_fd: int) -> None:
    """Cap the PIDs of a new sandbox, whose PIDs bubblewrap writes to ``info_fd`` (closed here)."""
    stream = trio.lowlevel.FdStream(info_fd)
    try:
        info = bytearray()
        with trio.move_on_after(10):
            while chunk := await stream.receive_some():
                info += chunk
        command = sandbox.cap_command(json.loads(info)["child-pid"])
        if command is None:
            raise ValueError("this machine cannot cap PIDs")
        with trio.fail_after(10):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        if done.returncode != 0:
            raise ValueError(done.stderr.decode(errors="replace").strip())
    finally:
        await stream.aclose()


class _Hop:
    """Around a use of the hop: a cancelled one (interrupted, or the lease ended) leaves the process in an
    unknown state, so it is killed; a broken socket means it died."""

    def __init__(self, slot: TaskSlot) -> None:
        self.slot = slot
        self.proc = slot._proc
        assert self.proc is not None

    async def __aenter__(self) -> None:
        pass

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        proc = self.proc
        assert proc is not None
        if kind is not None and issubclass(kind, trio.Cancelled):
            self.slot._forget()
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await proc.wait()
            self.slot._left_behind(proc)
        elif kind is not None and issubclass(kind, OSError):
            raise await self.slot._end(None) from None


def _ignore(number: int) -> None:
    pass


_LIVE: set[int] = set()  # task processes of every slot, which are the daemon's children by right


def reap_orphans(slot: int) -> int:
    """Kill and reap the daemon's children that a task process of ``slot`` left, or that hid their slot.

    Without a PID namespace this is how "nothing a task starts outlives it"
    holds: the daemon is a child subreaper (:func:`become_subreaper`), so a
    double fork lands here, not with init.  Returns how many were killed.
    """
    if not portability.procfs():
        return 0  # nothing to search (not Linux)
    me, mine, killed = os.getpid(), f"{SLOT_ENV}={slot}".encode(), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in _LIVE:
            continue
        pid = int(entry)
        try:
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != me:
                continue
            marks = [v for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                     if v.startswith(SLOT_ENV.encode() + b"=")]
        except (OSError, ValueError, IndexError):
            continue
        if marks and marks[0] != mine:
            continue  # another slot's, whose task process is still alive
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed += 1
        except (ProcessLookupError, ChildProcessError):
            pass
    if killed:
        log.info("killed %d process(es) left behind by a task of slot %d", killed, slot)
    return killed


def become_subreaper() -> bool:
    """Orphans of our task processes become our children, so :func:`reap_orphans` can end them."""
    global _subreaper
    _subreaper = prctl(_PR_SET_CHILD_SUBREAPER, 1)
    return _subreaper


_subreaper = False  # only a worker daemon's process is one: elsewhere (a test driving a slot) our children are
#                     not task processes' leftovers, but whatever else that process started


_PR_SET_CHILD_SUBREAPER = 36
