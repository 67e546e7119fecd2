"""One executor's running client: the scheduler, the trio thread it runs on and the board session.

They start together (an executor is usable once its board session is
open) and stop together: the leases end (politely, for a grace period),
then the loop thread, then the board session.  The thread-safe facade on
top, :class:`~p2pexec.executor.P2PExecutor`, keeps the futures and the
shutdown rules; what needs the loop thread, and how it ends, is here.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .board.client import BoardSession
from .config import Participant
from .protocol.messages import Inbox
from .runtime import TrioThread
from .scheduler import SCHEDULER_SKIPS, ClientScheduler, SchedulerOptions
from .stats import ExecutorStats

log = logging.getLogger("p2pexec.client")

OFFERS_SETTLE = 0.1  # capacity(): offers still coming in this long after the last one are counted too
LEAVE_GRACE = 1.0  # after Ctrl-C, how long workers get to confirm they stopped our tasks before we hang up


class ClientRuntime:
    """The scheduler on its loop thread, joined to the cluster's board; stopped once, from any thread."""

    def __init__(self, who: Participant, name: str, options: SchedulerOptions, known_hosts: Path,
                 accept_new_host_key: bool) -> None:
        self.scheduler = scheduler = ClientScheduler(who.identity, who.cluster, options)
        self.thread = TrioThread(self._serve, name=f"p2pexec-client-{name}")
        self.board: BoardSession | None = None  # once it is open
        self._lock = threading.Lock()
        self._stopped = False
        board = BoardSession(
            who.board, who.identity, who.cluster,
            inbox=Inbox(who.cluster, who.keyring, me=who.identity.user, skip=SCHEDULER_SKIPS),
            on_message=partial(self.thread.call_soon, scheduler.on_message),
            make_hello=scheduler.hello,
            on_connect=partial(self.thread.call_soon, scheduler.reannounce),
            on_refused=partial(self.thread.call_soon, scheduler.refused),  # the owner removed us
            known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
        )
        try:
            board.open()
        except BaseException:
            self.stop()
            raise
        self.board = scheduler.board = board
        self.thread.call_soon(scheduler.board_joined)

    async def _serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from .transport.host import ALL_INTERFACES, Libp2pHost

        try:
            async with Libp2pHost([ALL_INTERFACES], nat_traversal=True).running() as host:
                await self.scheduler.run(host, task_status=task_status)
        except BaseException as exc:
            self.scheduler.fail_all(RuntimeError(f"the p2pexec runtime stopped: {exc!r}"))
            raise

    def capacity(self, wait: float) -> int:
        """Slots leased or offered right now; with none known yet, asks the cluster and waits up to ``wait`` s."""
        thread, scheduler = self.thread, self.scheduler
        try:
            slots = thread.run_sync(scheduler.capacity)
        except trio.RunFinishedError:  # shut down: it holds none
            return 0
        if slots == 0 and not thread.here:  # (a done callback asks without waiting: it would block the loop)
            deadline = time.monotonic() + wait
            scheduler.capacity_known.clear()
            thread.call_soon(scheduler.probe)
            if scheduler.capacity_known.wait(wait):  # the first offer: the others come within moments
                while True:
                    scheduler.capacity_known.clear()
                    left = deadline - time.monotonic()
                    if left <= 0 or not scheduler.capacity_known.wait(min(OFFERS_SETTLE, left)):
                        break
            slots = thread.run_sync(scheduler.capacity)
        return slots

    def stats(self) -> ExecutorStats:
        try:
            return self.thread.run_sync(self.scheduler.stats)
        except trio.RunFinishedError:  # the loop has ended: no race
            return self.scheduler.stats()

    def leave_now(self) -> None:
        """Interrupt what runs on workers and stop, giving them :data:`LEAVE_GRACE` seconds to confirm."""
        if self.thread.alive:
            try:
                self.thread.run_sync(self.scheduler.interrupt_all)
            except trio.RunFinishedError:
                pass
        self.stop(grace=LEAVE_GRACE)

    def stop(self, grace: float = 5.0) -> None:
        """End the leases (politely for up to ``grace`` seconds), the loop thread and the board session."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.thread.alive:
            try:
                self.thread.run(self.scheduler.close, grace)
            except trio.RunFinishedError:
                pass
        self.thread.join(timeout=10)
        if self.board is not None:
            self.board.close(last_line=None)
