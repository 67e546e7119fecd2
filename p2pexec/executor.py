"""P2PExecutor: a concurrent.futures.Executor whose workers are friends' machines.

The thread-safe facade: it checks the options, numbers seeded tasks,
keeps the futures and the shutdown rules, and hands each task to the
scheduler.  Its I/O (the scheduler on its loop thread, the board session)
is :mod:`p2pexec.client_runtime`; ``map``'s chunks are
:mod:`p2pexec.mapping`; tasks waiting for futures among their arguments
wait in :mod:`p2pexec.waiting`; a task's payload is made by
:mod:`p2pexec.prepare`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import sys
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from concurrent.futures import Executor, Future, wait
from pathlib import Path
from typing import Any

from .board.client import DEFAULT_KNOWN_HOSTS
from .client_runtime import ClientRuntime
from .config import physical_memory, resolve
from .logs import quiet_dependencies
from .protocol.resources import ANY, Need
from .dependencies import futures_in, resolved
from .errors import RemoteTraceback
from .fitting import EnvFinder
from .mapping import Paces, is_map_chunk, map_in_chunks
from .namespaces import Initialized, sending_for
from .result_allowlist import task_package
from .seeding import Seeded
from .scheduler import SchedulerOptions, WorkItem
from .stats import ExecutorStats
from .stdlib_private import before_threads_are_joined
from .hoisting import Value, shared_values
from .prepare import Prepared, full_task, plain_task, prepare_task
from .tasks import OUT_OF_BAND, PrepickledFunction
from .waiting import Waiting

log = logging.getLogger("p2pexec.client")

_live_executors: "weakref.WeakSet[P2PExecutor]" = weakref.WeakSet()


def _shutdown_all() -> None:
    """At interpreter exit: finish the work, unless the program is ending on Ctrl-C (then leave at once).

    The interpreter keeps an uncaught exception in ``sys.last_value`` before it runs this hook.  An
    interactive session keeps it after any statement, so there an old Ctrl-C says nothing about now.
    """
    interrupted = _is_ctrl_c(getattr(sys, "last_value", None)) and not hasattr(sys, "ps1")
    for executor in list(_live_executors):
        if interrupted:
            executor._leave_now()
        else:
            executor.shutdown(wait=True)


before_threads_are_joined(_shutdown_all)


def _is_ctrl_c(exc: BaseException | None) -> bool:
    """A KeyboardInterrupt of this process: not one that a task raised on its worker and ``result()`` re-raised."""
    return isinstance(exc, KeyboardInterrupt) and not isinstance(exc.__cause__, RemoteTraceback)


_NO_BLOCK = contextlib.nullcontext()


def _pickled_initializer(executor: str, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]
                         ) -> tuple[Callable[[], Any] | None, dict[int, tuple[Any, Value]]]:
    """``initializer(*initargs)``, pickled once into the executor's namespaces (a task process loads it once);
    if that is big, a value that crosses once to each worker (hoisting.py), and the tasks name it."""
    if initializer is None:
        return None, {}
    if not callable(initializer):
        raise TypeError("initializer must be a callable")
    call = partial(initializer, *initargs)
    with sending_for(executor):
        pickled = PrepickledFunction(call)
        if len(pickled.data) < OUT_OF_BAND:
            return pickled, {}
        return call, {id(call): (call, Value.of(call))}


def _check_limits(*, max_workers: int | None, max_retries: int, task_timeout: float | None,
                  worker_timeout: float | None, warn_after: float, lease_idle: float, shutdown_timeout: float | None,
                  max_tasks_per_child: int | None, max_result_size: int | None) -> None:
    """P2PExecutor's numbers, checked before anything starts (ValueError or TypeError saying which)."""
    if max_workers is not None and max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    if max_retries < 0:
        raise ValueError("max_retries must be 0 or more")
    for name, seconds in (("task_timeout", task_timeout), ("worker_timeout", worker_timeout)):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"{name} must be greater than 0 seconds, or None for no limit")
    for name, seconds in (("warn_after", warn_after), ("lease_idle", lease_idle)):
        if not seconds > 0:
            raise ValueError(f"{name} must be greater than 0 seconds")
    if shutdown_timeout is not None and not shutdown_timeout >= 0:
        raise ValueError("shutdown_timeout must be 0 or more seconds, or None to wait for workers forever")
    if max_tasks_per_child is not None:  # (as ProcessPoolExecutor checks it)
        if not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child < 1:
            raise ValueError("max_tasks_per_child must be >= 1")
    if max_result_size is not None and max_result_size <= 0:
        raise ValueError("max_result_size must be greater than 0 bytes")


class P2PExecutor(Executor):
    """Runs calls on the workers of a cluster, like ProcessPoolExecutor runs them on processes.

    ``board`` defaults to ``$P2PEXEC_BOARD``, else the board ``p2pexec
    join`` saved for the cluster, else pico.sh's pipe host; ``identity``
    to ``$P2PEXEC_IDENTITY``, else the key ``p2pexec join`` saved, else
    ``~/.ssh/id_ed25519``;
    ``members`` (who may take part, authorized_keys style with names) to
    ``~/.config/p2pexec/clusters/OWNER/NAME.members``.

    ``allow`` limits the workers used to those run by the members named;
    ``task_timeout`` interrupts a task that runs longer (on its worker) and
    fails its future with ``TimeoutError``; a result over
    ``max_result_size`` bytes (default: half this machine's memory) fails
    its future with ``ResultTooLargeError``.  Results are unpickled with an
    allow-list (standard data types, exceptions, NumPy, your own classes),
    so a worker cannot run code here; ``result_types=["module.Name"]`` adds
    types, ``trusted_results=True`` accepts anything a worker sends.

    ``seed=S`` (an int, or True for a random one that is logged and kept in
    ``ex.seed``) makes random numbers reproducible: each task's ``random``, NumPy global and
    ``p2pexec.task_rng()`` streams derive from ``S`` and the task's place in
    submission order only (see :mod:`p2pexec.seeding`), whatever runs it.

    ``initializer(*initargs)`` runs in each task process before the first
    of this executor's tasks there, as in ProcessPoolExecutor: the globals
    it sets in your script or your own modules are there for every later
    task of this executor in that process (see :mod:`p2pexec.namespaces`).
    If it raises, the task fails with its exception and the next one tries
    it again.  With ``max_tasks_per_child=N`` a task process runs at most N
    of this executor's tasks, then exits and a fresh one takes the next.

    ``resources={"memory": "2GiB", "cores": 4, "gpus": 1, "tags": {"big"}}``
    sends every task only to worker slots that have that much (see
    :meth:`options` for some tasks only); a task is held to the memory it
    asked for.  ``requires=["numpy>=2"]`` (also in ``resources``) sends
    tasks only to workers whose installed distributions satisfy it.

    Tasks go only to workers that have the packages they refer to (read
    from their pickles), at the client's major version unless
    ``strict_versions=False``; when no online worker has one, the task
    fails with :class:`~p2pexec.errors.MissingPackageError` saying which
    and the command to run there.

    ``shutdown(wait=True)`` (and leaving ``with``) waits for the work while
    workers run it; once it has waited ``shutdown_timeout`` seconds
    (default 60; None waits forever) with no worker taking any of it
    (counted from the call, or from when the last worker went, whichever
    is later), the remaining futures fail with ``NoWorkersError`` naming the command a
    member must run.  Ctrl-C (KeyboardInterrupt) in ``result()``, a ``map``
    loop, ``with`` or the interpreter's exit cancels what is queued and
    stops what runs on workers, and the program ends within about a second.
    """

    def __init__(self, cluster: str, *, board: str | None = None, identity: str | os.PathLike[str] | None = None,
                 user: str | None = None, members: str | os.PathLike[str] | None = None,
                 max_workers: int | None = None, max_retries: int = 2, worker_timeout: float | None = None,
                 warn_after: float = 30.0, lease_idle: float = 10.0, shutdown_timeout: float | None = 60.0,
                 known_hosts: str | os.PathLike[str] = DEFAULT_KNOWN_HOSTS,
                 accept_new_host_key: bool = False, relay: str | list[str] | None = None,
                 allow: Iterable[str] | None = None, task_timeout: float | None = None,
                 max_result_size: int | None = None, trusted_results: bool = False,
                 result_types: Iterable[str] = (), seed: int | bool | None = None,
                 resources: Mapping[str, Any] | None = None, requires: Iterable[str] = (),
                 strict_versions: bool = True, initializer: Callable[..., Any] | None = None,
                 initargs: tuple[Any, ...] = (), max_tasks_per_child: int | None = None,
                 verbose: bool = False) -> None:
        _check_limits(max_workers=max_workers, max_retries=max_retries, task_timeout=task_timeout,
                      worker_timeout=worker_timeout, warn_after=warn_after, lease_idle=lease_idle,
                      shutdown_timeout=shutdown_timeout, max_tasks_per_child=max_tasks_per_child,
                      max_result_size=max_result_size)
        if seed is True:
            seed = secrets.randbits(64)
            log.info("seed=%d: pass seed=%d to P2PExecutor to draw the same random numbers again", seed, seed)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError("seed must be a non-negative int, True (a random one, logged) or None")
        self.seed: int | None = seed
        self._id = secrets.token_hex(8)  # names this executor's module namespaces in task processes
        self._initializer, self._big_initializer = _pickled_initializer(self._id, initializer, initargs)
        self._submits = self._maps = 0  # submission order: what a seeded task's random stream derives from
        self._need = _need(ANY, {**(resources or {}), **({"requires": requires} if requires else {})})
        self._envs = EnvFinder()
        if isinstance(allow, str):
            raise TypeError("allow= takes a list of member names, e.g. allow=['alice', 'bob']")
        who = resolve(cluster, board=board, user=user, identity=identity, members=members, relay=relay)
        self.cluster = who.cluster
        self._options = SchedulerOptions(
            max_workers=max_workers or 1 << 30, max_retries=max_retries, lease_idle=lease_idle,
            warn_after=warn_after, worker_timeout=worker_timeout, board_hint=who.board_hint,
            relays=who.relays, allow=frozenset(allow) if allow is not None else None, task_timeout=task_timeout,
            max_result_size=max_result_size or (physical_memory() or 8 << 30) // 2, trusted_results=trusted_results,
            result_types=frozenset(result_types), shutdown_timeout=shutdown_timeout, strict_versions=strict_versions,
            max_tasks_per_child=None if max_tasks_per_child is None else int(max_tasks_per_child))  # (True: 1)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._unfinished: set[Future[Any]] = set()
        self._waiting = Waiting()  # tasks waiting for the futures among their arguments
        # a map's short chunks share tasks, unless each must be timed (task_timeout) or counted on its own
        self._paces = Paces() if task_timeout is None and max_tasks_per_child is None else None

        quiet_dependencies(verbose)
        self._client = ClientRuntime(who, cluster, self._options, Path(known_hosts), accept_new_host_key)
        # (read by every submit: kept at hand, not looked up through the client)
        self._runtime, self._scheduler, self._board = self._client.thread, self._client.scheduler, self._client.board
        _live_executors.add(self)
        log.debug("executor for %s ready on %s as %s", self.cluster, who.board, who.identity.user)

    # -- Executor API -----------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(self._need, fn, args, kwargs)

    def _submit(self, need: Need, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Future[Any]:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not self._runtime.alive:
                raise RuntimeError("cannot schedule new futures: the p2pexec runtime has stopped")
            if (refusal := self._scheduler.refusal) is not None:
                raise type(refusal)(str(refusal))
            future: Future[Any] = Future()
            self._allow_classes_of(fn)
            if self.seed is not None and not is_map_chunk(fn):  # (map numbers its own items)
                fn, self._submits = Seeded(fn, self.seed, (0, self._submits)), self._submits + 1
            if self._initializer is not None:
                fn = Initialized(fn, self._initializer, self._id)
            try:
                with sending_for(self._id):
                    payload = plain_task(fn, args, kwargs)  # builtin data only: no Future among them
            except Exception:
                payload = None  # (full_task says why, on the future)
            if payload is not None:
                self._enqueue(future, fn, need, lambda: (payload, (), True))
            elif waiting_for := futures_in((args, kwargs)):
                self._unfinished.add(future)
                future.add_done_callback(self._unfinished.discard)
                self._waiting.hold(future, waiting_for, lambda: self._enqueue(
                    future, fn, need, lambda: prepare_task(fn, resolved(args), resolved(kwargs))))
            else:
                self._enqueue(future, fn, need, lambda: full_task(fn, args, kwargs))
            return future

    submit.__doc__ = (Executor.submit.__doc__ or "") + """
        A Future among the arguments (at top level, or in lists, tuples and
        dict values) is replaced by its result; the task is sent once they
        all finished, holding no worker meanwhile, and fails with the first
        one's exception if one failed."""

    def _enqueue(self, future: Future[Any], fn: Callable[..., Any], need: Need,
                 prepare: Callable[[], Prepared]) -> None:
        """Queue the task, whose payload ``prepare`` makes (its error fails the future)."""
        runtime, scheduler = self._runtime, self._scheduler
        if not runtime.alive:
            future.set_exception(RuntimeError("the p2pexec runtime stopped before this task could be sent"))
            return
        try:
            with sending_for(self._id), shared_values(self._big_initializer) if self._big_initializer else _NO_BLOCK:
                payload, values, plain = prepare()
        except Exception as exc:
            future.set_exception(exc)
            return
        env = self._envs.of(fn, plain, payload, values)
        scheduler.fitting.want(env)
        item = WorkItem(future, payload, scheduler.next_id(), need=need, env=env, since=time.monotonic(),
                        values=values)
        if future not in self._unfinished:  # (a task that waited for futures is there already)
            self._unfinished.add(future)
            future.add_done_callback(self._unfinished.discard)
        scheduler.pending.append(item)
        if not scheduler.wakeup_pending:  # one wake-up serves every submit queued before it runs
            scheduler.wakeup_pending = True
            runtime.call_soon(scheduler.wake)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like ProcessPoolExecutor.map: ``chunksize`` items travel and run together."""
        return self._map(self, fn, iterables, timeout, chunksize)

    def options(self, *, memory: str | int | None = None, cores: int | None = None, gpus: int | None = None,
                tags: Iterable[str] | None = None, requires: Iterable[str] | None = None) -> "ExecutorView":
        """This executor for tasks that ask for more: ``ex.options(memory="2GiB", gpus=1).map(f, xs)``.

        The view shares this executor's leases, seed and runtime; its tasks
        go only to worker slots with ``memory`` (bytes or ``"2GiB"``: the task
        is stopped if it uses more), ``cores``, ``gpus`` (the task process
        sees that many, in ``CUDA_VISIBLE_DEVICES``) and every one of
        ``tags`` (``p2pexec-worker --tag``), whose installed distributions
        satisfy ``requires`` (``["numpy>=2", "scikit-learn"]``).  What is not
        given comes from ``resources=``.  When no online worker could ever
        meet it, the no-worker warning (``warn_after``) says which
        requirement and what the workers have.
        """
        return ExecutorView(self, _need(self._need, {"memory": memory, "cores": cores, "gpus": gpus, "tags": tags,
                                                     "requires": requires}))

    def _map(self, submitter: Executor, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
             timeout: float | None, chunksize: int) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        self._allow_classes_of(fn)
        seeded = None
        if self.seed is not None:
            with self._shutdown_lock:
                seeded, self._maps = (self.seed, self._maps), self._maps + 1
        with sending_for(self._id):
            return map_in_chunks(submitter, fn, iterables, timeout, chunksize, seeded, self._paces,
                                 lambda: self.capacity(0))

    def interrupt(self, future: Future[Any]) -> bool:
        """Cancel ``future`` even if its task is running: the worker stops it by killing its task process.

        Returns True if the future ends cancelled (``result()`` raises
        ``CancelledError``), False if it had already finished.  Unlike
        ``Future.cancel()``, this also works once the task was sent to a
        worker; the worker frees the slot within moments.
        """
        if future in self._waiting:  # still waiting for the futures among its arguments: never sent
            return future.cancel()
        if not self._runtime.alive:
            return future.cancel()
        return self._runtime.run_sync(self._scheduler.interrupt, future)

    def capacity(self, wait: float = 2.0) -> int:
        """Slots leased or offered right now; with none known yet, asks the cluster and waits up to ``wait`` s
        (not in a done callback, which runs on the executor's own thread); 0 once shut down.

        This is what ``n_jobs=-1`` means for joblib's p2pexec backend.
        """
        return self._client.capacity(wait)

    def stats(self) -> ExecutorStats:
        """Queued, running, done and failed tasks of this executor, overall and per worker (a snapshot)."""
        return self._client.stats()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            already = self._shutdown
            self._shutdown = True
        scheduler, runtime = self._scheduler, self._runtime
        if cancel_futures:
            self._waiting.cancel_all()
            runtime.call_soon(scheduler.withdraw_queued)
        if already and not wait:
            return
        if not wait:
            runtime.call_soon(scheduler.leaving)
            threading.Thread(target=self._finish, name="p2pexec-shutdown", daemon=True).start()
            return
        try:  # (from the moment we say we are leaving: a Ctrl-C then must not slip past)
            runtime.call_soon(scheduler.leaving)
            self._finish()
        except KeyboardInterrupt:  # Ctrl-C while waiting: one is enough
            self._leave_now()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: Any) -> None:
        """Wait for the work as the stdlib does, except after Ctrl-C: then cancel it and leave at once."""
        if _is_ctrl_c(exc_val):
            self._leave_now()
        else:
            self.shutdown(wait=True)

    # -- internals ----------------------------------------------------------------------
    def _allow_classes_of(self, fn: Callable[..., Any]) -> None:
        """Results may hold classes of the installed package a task function comes from."""
        package = task_package(fn)
        if package is not None:
            self._scheduler.task_packages.add(package)  # (a set.add is atomic: no lock with the loop thread)

    def _leave_now(self) -> None:
        """After Ctrl-C: cancel what is queued, interrupt what runs on workers, stop within about a second."""
        with self._shutdown_lock:
            self._shutdown = True
        self._waiting.cancel_all()
        self._client.leave_now()
        _live_executors.discard(self)

    def _finish(self) -> None:
        while self._runtime.alive and self._unfinished:
            wait(list(self._unfinished), timeout=1.0)
        self._client.stop()
        _live_executors.discard(self)


def _need(base: Need, requests: Mapping[str, Any]) -> Need:
    """``base`` with the requests given (None: keep its own); a clear error for a wrong name or value."""
    unknown = set(requests) - {"memory", "cores", "gpus", "tags", "requires"}
    if unknown:
        raise TypeError(f"unknown resource {sorted(unknown)[0]!r}: ask for memory, cores, gpus, tags or requires")
    return base.updated(**{name: value for name, value in requests.items() if value is not None})


class ExecutorView(Executor):
    """:meth:`P2PExecutor.options`: the same executor, whose tasks ask for more of their worker.

    ``shutdown`` (and leaving ``with``) waits for, or cancels, only the
    tasks submitted through this view; the executor itself stays open.
    """

    def __init__(self, executor: P2PExecutor, need: Need) -> None:
        self.executor = executor
        self.need = need
        self._futures: set[Future[Any]] = set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = self.executor._submit(self.need, fn, args, kwargs)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    submit.__doc__ = P2PExecutor.submit.__doc__

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like :meth:`P2PExecutor.map`, on slots that meet this view's needs."""
        return self.executor._map(self, fn, iterables, timeout, chunksize)

    def options(self, *, memory: str | int | None = None, cores: int | None = None, gpus: int | None = None,
                tags: Iterable[str] | None = None, requires: Iterable[str] | None = None) -> ExecutorView:
        """A view asking for these on top of this view's needs."""
        return ExecutorView(self.executor, _need(self.need, {"memory": memory, "cores": cores, "gpus": gpus,
                                                            "tags": tags, "requires": requires}))

    def interrupt(self, future: Future[Any]) -> bool:
        return self.executor.interrupt(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for future in list(self._futures):
                future.cancel()
        if wait:
            concurrent.futures.wait(list(self._futures))

    def __repr__(self) -> str:
        return f"<ExecutorView of {self.executor.cluster} asking for {self.need}>"
