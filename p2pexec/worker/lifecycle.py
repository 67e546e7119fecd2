"""How a worker process lives and ends, around its daemon: its key, its memory, signals, its parent.

:func:`~.daemon.serve` uses these before and while the daemon runs: a word
on the key the worker signs with, a non-dumpable process, the first
SIGINT/SIGTERM draining and a second stopping at once, and stopping when a
LocalCluster's process that started the worker has ended.  They are apart
from :mod:`.daemon` because none of them is about serving leases: they are
about the process the daemon runs in.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..keys import Identity
from .privileges import prctl

if TYPE_CHECKING:
    from .daemon import WorkerDaemon

log = logging.getLogger("p2pexec.worker")

DEFAULT_KEY = Path("~/.ssh/id_ed25519")
_PR_SET_DUMPABLE = 4
PARENT_CHECK_SECONDS = 0.2


def say_how_we_sign(who: Identity, cluster: str, memory_protected: bool) -> None:
    """The friend should know which key their worker signs with, and not lend it their everyday key (nor the
    owner the key that signs the member list)."""
    log.info("worker signs as %s with %s; %s", who.user, who.where,
             "its memory is closed to other processes of this user (non-dumpable)" if memory_protected else
             "its memory could not be closed to other processes of this user")
    if who.user == cluster.partition("/")[0]:
        own = "~/.config/p2pexec-worker"
        log.warning("this worker signs with the key of %s, who owns %s: the key that signs its member list, kept "
                    "in a process that runs members' code. Safer: lend this machine as a member of its own: "
                    "p2pexec invite %s %s-box, then P2PEXEC_CONFIG=%s p2pexec join CODE, then "
                    "P2PEXEC_CONFIG=%s p2pexec-worker --cluster %s", who.user, cluster, cluster, who.user, own,
                    own, cluster)
    elif who.path is not None and who.path.expanduser().resolve() == DEFAULT_KEY.expanduser().resolve():
        log.warning("this worker signs with your general-purpose SSH key %s: anyone who gets it can log in where "
                    "it does. Prefer a key of its own: in a cluster you joined, ask for a new invitation and "
                    "join without --identity (p2pexec makes its own key); with a members file, ssh-keygen -t "
                    "ed25519 -f ~/.ssh/p2pexec_worker, add it there, then --identity ~/.ssh/p2pexec_worker", who.path)


def protect_memory() -> bool:
    """Make this process non-dumpable, so processes of the same user (its tasks among them) can neither
    ptrace it nor read ``/proc/<pid>/mem``; False where the platform cannot."""
    return prctl(_PR_SET_DUMPABLE, 0)


async def leave_on_signals(daemon: WorkerDaemon, stop: trio.CancelScope, drain: float) -> None:
    """First SIGINT/SIGTERM: drain for up to ``drain`` s; a second one: stop now, killing running tasks."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        name = signal.Signals(await anext(signals)).name
        if not daemon.serving or drain <= 0:
            log.info("received %s; stopping", name)
            stop.cancel()
            return
        log.info("received %s; draining: no new leases, tasks not started go back to their clients", name)
        running = await daemon.drain()
        if running:
            log.warning("draining: %d task(s) running, Ctrl-C again to stop now (stopping anyway in %g s)",
                        running, drain)
        with trio.move_on_after(drain) as timer:
            async with trio.open_nursery() as race:
                race.start_soon(_then_cancel, daemon.drained.wait, race.cancel_scope)
                race.start_soon(_then_cancel, partial(anext, signals), race.cancel_scope)
        if daemon.drained.is_set():
            log.info("drained: every task was answered; stopping")
        else:
            log.warning("stopping now%s: killing %d running task(s); their clients run them elsewhere",
                        f" after {drain:g} s of draining" if timer.cancelled_caught else "", daemon.running)
        stop.cancel()


async def _then_cancel(afn: Callable[[], Any], scope: trio.CancelScope) -> None:
    """Await ``afn()``, then cancel ``scope``: the first of several waits to finish wins."""
    await afn()
    scope.cancel()


async def end_with_parent(parent: int, stop: trio.CancelScope) -> None:
    """Stop once process ``parent`` has ended, however it ended (SIGKILL, a notebook kernel restart).

    Its death reparents us, which ``getppid`` shows.  PR_SET_PDEATHSIG
    would fire when the *thread* that started us ends, which may be long
    before its process; a pipe's EOF would wait for every process that
    inherited its other end (anything the parent forked).  :func:`~.daemon.serve`
    then removes the LocalCluster's directory, which holds private keys.
    Where Linux gives a pidfd for the parent, its end wakes us (a worker
    polling five times a second cost 1% of a core with 32 on a machine);
    elsewhere we look at ``getppid``.
    """
    try:
        pidfd = os.pidfd_open(parent)  # type: ignore[attr-defined,unused-ignore]  # (Linux 5.3+)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if pidfd is not None and os.getppid() == parent:
            await trio.lowlevel.wait_readable(pidfd)  # readable once it has ended
        while os.getppid() == parent:
            await trio.sleep(PARENT_CHECK_SECONDS)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    log.warning("the process that started this worker (pid %d) has ended; stopping", parent)
    stop.cancel()
