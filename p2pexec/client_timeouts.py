"""What the client's clock decides, without I/O: tasks whose packages no online worker has, tasks past
task_timeout and workers that do not stop them, the no-worker warning, worker_timeout and
shutdown_timeout.  :meth:`Timeouts.tick` reads the core (:class:`~.client_core.ClientCore`) and
returns actions like it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client_state import SKIP_AT_MOST, Action, EndLease, Fail, Warn, fail_waiting
from .errors import NoWorkersError, ProtocolError
from .protocol.frames import Op
from .protocol.lease import SILENCE_SECONDS
from .protocol.resources import ANY, Need
from .task_env import NOTHING

if TYPE_CHECKING:
    from .client_core import ClientCore

REWARN_AT_MOST_EVERY = 5.0  # the no-worker warning repeats only when its news changed, at most this often
HOPELESS_AFTER = 3.0  # a task lacking packages everywhere fails only after this long (the last hellos arrive)


class Timeouts:
    def __init__(self) -> None:
        self.starving: dict[Need, float] = {}  # since when each need's work has had no open lease
        self.warned: frozenset[Any] | None = None  # what the last no-worker warning said, this episode
        self.warned_at = -1e9
        self.leaving_since: float | None = None  # when shutdown() was called

    def tick(self, core: ClientCore, now: float) -> list[Action]:
        """Fail the hopeless and the overdue; warn (and give up) when no worker comes."""
        done = self._fail_hopeless(core, now)
        if core.options.task_timeout is not None:
            done += self._time_out(core, now)
        served = {lease.need for lease in core.leases if lease.open}
        starving = [need for need in core.pending.needs() if need not in served]
        self.starving = {need: self.starving.get(need, now) for need in starving}  # (each need on its own clock)
        if not starving:
            self.warned = None
            return done
        waited = now - min(self.starving.values())
        if waited >= core.options.warn_after:
            news = frozenset(core.sightings(now))
            if self.warned is None or (news != self.warned and now - self.warned_at >= REWARN_AT_MOST_EVERY):
                self.warned, self.warned_at = news, now
                done.append(Warn(f"no worker has run tasks{_asking(starving)} for cluster {core.cluster} in "
                                 f"{waited:.0f} s; {core.starving_hint(now)}"))
        if core.options.worker_timeout is not None:
            done += self._no_worker_came(core, now, core.options.worker_timeout)
        return done + self._give_up_leaving(core, now)

    def _no_worker_came(self, core: ClientCore, now: float, timeout: float) -> list[Action]:
        """Fail each waiting task that no worker could take for ``timeout`` s: since it was queued, or since
        its need lost its last lease, whichever came later (a task submitted just after others timed out has
        all its time)."""
        done: list[Action] = []
        error: NoWorkersError | None = None
        for need, since in self.starving.items():  # (a line is oldest first: look no further than its first young)
            while (head := core.pending.head(need, 1)) and now - max(head[0].since, since) >= timeout:
                core.pending.remove(head[0])
                error = error or NoWorkersError(f"no worker of cluster {core.cluster} took this task within "
                                                f"{timeout:g} s; {core.starving_hint(now)}")
                done += fail_waiting(head[0], error)
        return done

    def _fail_hopeless(self, core: ClientCore, now: float) -> list[Action]:
        """Fail the waiting tasks whose packages no online worker has (every one has answered)."""
        online = core.online(now)
        verdicts: dict[int, Exception | None] = {}
        done: list[Action] = []
        for need in core.pending.needs():
            for item in core.pending.head(need, SKIP_AT_MOST):
                if item.env is NOTHING or now - item.since < HOPELESS_AFTER:
                    continue
                if id(item.env) not in verdicts:
                    verdicts[id(item.env)] = core.fitting.hopeless(item.env, online, now)
                error = verdicts[id(item.env)]
                if error is not None:
                    core.pending.remove(item)
                    done += fail_waiting(item, error)
        return done

    def _give_up_leaving(self, core: ClientCore, now: float) -> list[Action]:
        """shutdown() must not wait forever for workers that never come: fail what none took in time."""
        limit = core.options.shutdown_timeout
        if self.leaving_since is None or limit is None or not self.starving or not core.pending:
            return []
        if now - max(min(self.starving.values()), self.leaving_since) < limit:
            return []
        hint = core.starving_hint(now)
        return [Warn(f"shutdown: no worker of cluster {core.cluster} took the {len(core.pending)} remaining task(s) "
                     f"in {limit:g} s; failing them with NoWorkersError; {hint}"),
                *core.fail_pending(NoWorkersError(
                    f"the executor shut down and no worker of cluster {core.cluster} took this task in {limit:g} s "
                    f"(shutdown_timeout); {hint}, or pass a larger shutdown_timeout="))]

    def _time_out(self, core: ClientCore, now: float) -> list[Action]:
        """Tasks past task_timeout fail with TimeoutError at once; their workers are told to stop them.

        A worker that has not answered such an interrupt after :data:`SILENCE_SECONDS`
        (an honest one kills the task process at once) holds slots it will never
        free: it is dropped as broken, and the rest of its tasks run elsewhere.
        """
        done: list[Action] = []
        for lease in core.leases:
            for item in [i for i in lease.inflight.values() if i.deadline <= now]:
                if item.future.done():  # interrupted earlier, and still not answered
                    done.append(EndLease(lease, ProtocolError(
                        f"worker {lease.label} did not stop task {item.id} within {SILENCE_SECONDS:g} s of "
                        f"being asked")))
                    item.deadline = float("inf")
                    continue
                done.append(Fail(item, TimeoutError(
                    f"the task ran longer than task_timeout={core.options.task_timeout:g} s on worker "
                    f"{lease.label}; it was interrupted there")))
                item.deadline = now + SILENCE_SECONDS
                if not item.cancel_asked:
                    done.append(core.ask_cancel(lease, item, Op.INTERRUPT))
        return done


def _asking(needs: list[Need]) -> str:
    """`` asking for memory=2 GiB`` for the needs that starve, unless it is only plain tasks."""
    named = [str(need) for need in needs if need != ANY]
    return f" (tasks asking for {'; '.join(named)})" if named else ""
