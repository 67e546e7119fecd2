"""How an executor is doing: ``P2PExecutor.stats()`` and the counts a client tells ``p2pexec status``.

Counting happens on the client's trio loop (:class:`Tally`); what the
user's thread gets is a frozen snapshot (:class:`ExecutorStats`), so
nothing it holds changes under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerStats:
    """One worker daemon, as this executor saw it: ``member`` runs it, ``peer`` is its libp2p id,
    ``machine`` the name it gives its machine (``p2pexec-worker --name``; its host name by default).

    ``done`` and ``failed`` count the tasks whose futures it settled (or, for
    a task lost with its worker, the worker it ran on last); ``running``
    what it holds now, started or queued there.
    """

    member: str
    peer: str
    done: int = 0
    failed: int = 0
    running: int = 0
    machine: str = ""


@dataclass(frozen=True)
class ExecutorStats:
    """A snapshot of one executor's tasks.

    ``queued``: submitted, not sent to any worker yet; ``running``: sent to
    a worker and not answered; ``done``: returned a value; ``failed``: ended
    with an exception (raised by the task, its process died, timed out,
    lost, refused, no worker).  Cancelled futures are in none of them.
    A ``map`` counts its tasks: one chunk each, or several short ones
    (:mod:`p2pexec.mapping`), done unless the task as a whole failed (a
    chunk that raised in a task of several is not counted as failed).
    ``workers`` lists every worker that ran or holds a task, by peer.

    What went to workers: ``bytes_sent``, the payloads of tasks and big
    values (encryption and framing aside); ``values_sent`` and
    ``value_bytes_sent``, the big values among them (each sent once per
    worker, again only when a worker no longer held it: ``values_missed``
    counts those answers).
    """

    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    workers: tuple[WorkerStats, ...] = field(default_factory=tuple)
    bytes_sent: int = 0
    values_sent: int = 0
    value_bytes_sent: int = 0
    values_missed: int = 0


@dataclass
class _Counts:
    member: str
    machine: str = ""
    done: int = 0
    failed: int = 0


class Tally:
    """Done and failed counts, overall and per worker peer; touched on the client's loop only."""

    MAX_WORKERS = 4096  # beyond this many peers, the oldest are forgotten (the totals stay right)

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self._by_peer: dict[str, _Counts] = {}
        self.bytes_sent = 0  # task and value payloads sent to workers
        self.values_sent = 0
        self.value_bytes_sent = 0
        self.values_missed = 0  # a worker no longer held a value a task needed: both were sent again

    def settled(self, ok: bool, member: str | None, peer: str | None, machine: str = "") -> None:
        """A future ended with a result (``ok``) or an exception, last sent to ``peer`` run by ``member``
        on ``machine``."""
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if peer is None or member is None:
            return
        counts = self._by_peer.get(peer)
        if counts is None:
            if len(self._by_peer) >= self.MAX_WORKERS:
                del self._by_peer[next(iter(self._by_peer))]
            counts = self._by_peer[peer] = _Counts(member, machine)
        if ok:
            counts.done += 1
        else:
            counts.failed += 1

    def snapshot(self, queued: int, running: dict[tuple[str, str, str], int]) -> ExecutorStats:
        """Freeze the counts; ``running`` maps (member, peer, machine) to the tasks that worker holds now."""
        held = {peer: count for (_, peer, _), count in running.items()}
        peers = {peer: _Counts(member, machine) for member, peer, machine in running} | self._by_peer
        workers = []
        for peer, counts in sorted(peers.items(), key=lambda kv: (kv[1].member, kv[0])):
            workers.append(WorkerStats(counts.member, peer, counts.done, counts.failed, held.get(peer, 0),
                                       counts.machine))
        return ExecutorStats(queued=queued, running=sum(running.values()), done=self.done, failed=self.failed,
                             workers=tuple(workers), bytes_sent=self.bytes_sent, values_sent=self.values_sent,
                             value_bytes_sent=self.value_bytes_sent, values_missed=self.values_missed)
