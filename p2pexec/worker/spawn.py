"""Task processes started from the thread that runs the daemon, not from one of trio's helper threads.

bubblewrap's ``--die-with-parent`` (``PR_SET_PDEATHSIG``) fires when the
*thread* that started it ends, not its process.  ``trio.lowlevel.open_process``
starts children from a helper thread, and trio retires a helper thread
after 10 s idle: every sandboxed task process was SIGKILLed 10 s after it
started.  Started from the daemon's own thread, the sandbox ends with the
daemon, as it should, and not before.  The start blocks the loop for one
fork and exec (a few milliseconds, once a task process).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

import trio

from ..runtime import in_thread_until_cancelled


class Child:
    """The little of ``trio.Process`` a task slot uses, over a :class:`subprocess.Popen`."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):  # (not Linux 5.3+: a thread waits instead)
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        self._popen.kill()  # (nothing, once it was reaped)

    async def wait(self) -> int:
        if self._popen.poll() is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                await in_thread_until_cancelled(self._popen.wait)
        code = self._popen.wait()  # (it has ended: this only reaps it)
        self._close()
        return code

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        self._close()


def start_child(argv: Sequence[str], **options: Any) -> Child:
    """``subprocess.Popen(argv, **options)`` from the calling thread (the daemon's), as a :class:`Child`."""
    return Child(subprocess.Popen(argv, **options))
