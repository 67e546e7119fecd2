"""Execution slots: each one a long-lived task process driven from trio."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from ..protocol.frames import TASK_LENGTH, Buffer

log = logging.getLogger("p2pexec.worker")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


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


PIPE_BYTES = 1 << 20


def _widen(pipe: Any) -> None:
    """1 MiB pipes, not 64 KiB: 256 MiB crossed in 0.28 s instead of 0.44-0.77 s here."""
    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (OSError, AttributeError):
        pass  # not Linux, or over /proc/sys/fs/pipe-max-size: the default size works, more slowly


class TaskProcessDied(Exception):
    """The task process ended while running a task; its message says how."""


class TaskSlot:
    """Runs one task at a time in its own process, restarting it after a crash."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._proc: trio.Process | None = None
        self.member: str | None = None  # whose code the current process has run

    async def assign(self, member: str) -> None:
        """Serve ``member`` next, in a process no other member's task has run in.

        A task can change its process for good (patch modules, start
        threads); a process is therefore never shared between members, only
        reused for the same member's next lease.
        """
        if self.member not in (None, member):
            await self.stop()  # the next task starts a fresh process
        self.member = member

    async def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "p2pexec.worker.taskproc"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        for pipe in (proc.stdin, proc.stdout):
            _widen(pipe)
        try:
            ready = await self._receive_exactly(proc, TASK_LENGTH.size)
        except EOFError:
            await proc.wait()
            raise TaskProcessDied(f"a new task process {describe_exit(proc.returncode)} while starting") from None
        if ready != TASK_LENGTH.pack(0):
            proc.kill()
            raise TaskProcessDied("a new task process sent garbage instead of its ready signal")
        self._proc = proc

    async def run(self, payload: Buffer) -> bytearray:
        """Run one task payload; returns the outcome bytes or raises TaskProcessDied."""
        if self._proc is None or self._proc.returncode is not None:
            await self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            size = memoryview(payload).nbytes
            if size <= 1 << 16:  # one write, one wake-up of the task process
                await proc.stdin.send_all(TASK_LENGTH.pack(size) + bytes(payload))
            else:
                await proc.stdin.send_all(TASK_LENGTH.pack(size))
                await proc.stdin.send_all(payload)
            header = await self._receive_exactly(proc, TASK_LENGTH.size)
            (size,) = TASK_LENGTH.unpack(header)
            try:
                outcome = bytearray(size)
            except (MemoryError, OverflowError):
                self._proc = None
                proc.kill()
                await proc.wait()
                raise TaskProcessDied(f"the task's outcome ({size} bytes) does not fit in this worker's memory") \
                    from None
            return await self._receive_into(proc, outcome)
        except trio.Cancelled:
            # Abandoned mid-task (the lease ended): the process state is unknown.
            self._proc = None
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await proc.wait()
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            self._proc = None
            raise TaskProcessDied(f"the task process {describe_exit(proc.returncode)}") from None

    @classmethod
    async def _receive_exactly(cls, proc: trio.Process, n: int) -> bytearray:
        return await cls._receive_into(proc, bytearray(n))

    @staticmethod
    async def _receive_into(proc: trio.Process, buf: bytearray) -> bytearray:
        assert proc.stdout is not None
        got, n = 0, len(buf)
        while got < n:
            chunk = await proc.stdout.receive_some(min(n - got, 1 << 20))
            if not chunk:
                raise EOFError
            buf[got : got + len(chunk)] = chunk
            got += len(chunk)
        return buf

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5):
            await proc.wait()
