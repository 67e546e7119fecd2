"""joblib's ``p2pexec`` backend: ``Parallel`` and scikit-learn's ``n_jobs`` on friends' machines.

    with joblib.parallel_config(backend="p2pexec", executor=ex):   # an open P2PExecutor
        GridSearchCV(..., n_jobs=-1).fit(X, y)

    with joblib.parallel_config(backend="p2pexec", cluster="alice/friends"):  # opens and closes its own

``n_jobs=-1`` means the slots leased or offered right now (at least one).
Calls are auto-batched the way loky batches them, so many tiny calls
travel in few tasks.  joblib is imported by the user, never by p2pexec
itself (it costs 0.1 s): the backend registers itself when joblib is
imported, before or after p2pexec.  joblib has no public base class for
backends; ``joblib._parallel_backends`` is what dask and Ray use too.  All
the private API is in one section below, for the joblib versions in
``JOBLIB_RANGE`` (pinned in pyproject.toml); with any other joblib, using
the backend fails with an error that names the range.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable

NAME = "p2pexec"
JOBLIB_RANGE = ">=1.5,<1.7"  # ParallelBackendBase.submit arrived in 1.5; keep in step with pyproject.toml
_registered = threading.Lock()


# ---- joblib's private API ----
# Beyond the backend methods P2PExecBackend implements (joblib's interface for backends), every use of
# joblib's private API is in this section, for the versions in JOBLIB_RANGE; tests/test_private_apis.py
# fails loudly if a joblib release moves any of it.

def _private_bases() -> tuple[type, type]:
    """The base classes joblib's own backends use: joblib has no public ones."""
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

    return AutoBatchingMixin, ParallelBackendBase


def _calls_of(batch: Any) -> list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    """The (function, args, kwargs) calls of a ``BatchedCalls``; empty for anything else."""
    return getattr(batch, "items", None) or []


def _nesting_of(batch: Any) -> tuple[Any, int]:
    """The backend and n_jobs a ``BatchedCalls`` runs its calls under (what nested Parallel calls see)."""
    return batch._backend, batch._n_jobs


def _run_batch(fn: Callable[..., Any], backend: Any, n_jobs: int, calls: list[tuple[Any, Any]]) -> list[Any]:
    """On the worker: a batch as joblib runs it (nested Parallel calls see the nested backend)."""
    from joblib.parallel import BatchedCalls

    return BatchedCalls([(fn, args, kwargs) for args, kwargs in calls], (backend, n_jobs))()


def _batch_history(backend: Any) -> tuple[int, float]:
    """AutoBatchingMixin's batch size now and its smoothed duration of the batches of that size."""
    return backend._effective_batch_size, backend._smoothed_batch_duration


def _set_batch_size(backend: Any, size: int) -> None:
    """A new batch size for AutoBatchingMixin, its duration to be measured afresh (as the mixin itself does)."""
    backend._effective_batch_size = size
    backend._smoothed_batch_duration = backend._DEFAULT_SMOOTHED_BATCH_DURATION

# ---- end of joblib's private API ----


def _check_joblib_version() -> None:
    """Refuse, by name, a joblib whose private API the backend was not tested on (it would fail obscurely)."""
    import joblib
    from packaging.specifiers import SpecifierSet

    if not SpecifierSet(JOBLIB_RANGE).contains(joblib.__version__, prereleases=True):
        raise ImportError(f"p2pexec's joblib backend needs joblib{JOBLIB_RANGE}, not joblib {joblib.__version__} "
                          f"(it builds on joblib's private backend classes): pip install 'joblib{JOBLIB_RANGE}'")


def _backend_class() -> type:
    from .executor import P2PExecutor
    from .tasks import PrepickledFunction, is_plain

    class P2PExecBackend(*_private_bases()):  # type: ignore[misc]
        """Runs joblib's batches as tasks of a P2PExecutor (given, or opened from cluster arguments)."""

        supports_retrieve_callback = True
        supports_timeout = True
        default_n_jobs = -1

        def __init__(self, executor: P2PExecutor | None = None, nesting_level: int | None = None,
                     inner_max_num_threads: int | None = None, **executor_kwargs: Any) -> None:
            super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
            self._executor = executor
            self._executor_kwargs = executor_kwargs
            self._owned = False
            self._futures: set[Future[Any]] = set()
            self._runners: dict[tuple[Any, ...], tuple[Callable[..., Any], PrepickledFunction]] = {}

        def _open(self) -> P2PExecutor:
            """The executor given, or else the one opened from the cluster arguments (until :meth:`terminate`)."""
            if self._executor is None:
                kwargs = dict(self._executor_kwargs)
                cluster = kwargs.pop("cluster", None)
                if cluster is None:
                    raise ValueError("the p2pexec backend needs executor=P2PExecutor(...) or cluster='owner/name'")
                self._executor, self._owned = P2PExecutor(cluster, **kwargs), True
            return self._executor

        def configure(self, n_jobs: int = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
            self._open()
            self.parallel = parallel
            return self.effective_n_jobs(n_jobs)

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            """Negative ``n_jobs`` counts the cluster's slots, so it opens the executor if it is not open yet
            (scikit-learn asks before its first Parallel call, which then uses that executor)."""
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            if n_jobs is None:
                n_jobs = self.default_n_jobs
            if n_jobs > 0:
                return n_jobs
            return max(1, self._open().capacity() + 1 + n_jobs)  # -1: all of them, -2: all but one, as joblib means it

        def compute_batch_size(self) -> int:
            """loky's rule, but growing up to 8x a step instead of 2x while batches are far too short.

            A round trip here costs milliseconds, not microseconds, and joblib polls
            for results every 10 ms: the fewer steps to a good batch size, the better.
            """
            old, duration = _batch_history(self)
            if 0 < duration < self.MIN_IDEAL_BATCH_DURATION / 8:
                size = min(8 * old, int(old * self.MIN_IDEAL_BATCH_DURATION / duration))
                _set_batch_size(self, size)
                return size
            return super().compute_batch_size()

        def submit(self, func: Callable[[], Any], callback: Callable[[Future[Any]], None] | None = None) -> Any:
            assert self._executor is not None
            for inner in {f for f, _, _ in _calls_of(func)}:  # results may hold their packages' classes
                self._executor._allow_classes_of(inner)
            future = self._executor.submit(*self._as_task(func))
            self._futures.add(future)
            future.add_done_callback(self._futures.discard)
            if callback is not None:
                future.add_done_callback(callback)
            return future

        def _as_task(self, batch: Any) -> tuple[Any, ...]:
            """A batch of calls of one function with plain arguments travels as that function, pickled once
            per Parallel call, and the arguments, pickled by the C pickler: 10-50x cheaper than dill's
            pickling of joblib's BatchedCalls (a few ms per batch, on the thread that dispatches)."""
            items = _calls_of(batch)
            if not items or any(f is not items[0][0] for f, _, _ in items):
                return (batch,)
            calls = [(args, kwargs) for _, args, kwargs in items]
            if not is_plain(calls):
                return (batch,)
            fn, nested = items[0][0], _nesting_of(batch)
            key = (id(fn), type(nested[0]), nested[1])
            runner = self._runners.get(key)
            if runner is None or runner[0] is not fn:
                try:
                    runner = (fn, PrepickledFunction(partial(_run_batch, fn, *nested)))
                except Exception:
                    return (batch,)  # (submit reports a pickling error on its future)
                if len(self._runners) > 64:
                    self._runners.clear()
                self._runners[key] = runner
            return runner[1], calls

        def retrieve_result_callback(self, future: Future[Any]) -> Any:
            return future.result()

        def abort_everything(self, ensure_ready: bool = True) -> None:
            """A call failed: the rest of this Parallel call is not wanted (running tasks are stopped)."""
            if self._executor is not None:
                for future in list(self._futures):
                    self._executor.interrupt(future)
            if not ensure_ready:
                self.terminate()

        def terminate(self) -> None:
            if self._owned and self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor, self._owned = None, False

    return P2PExecBackend


def _make_backend(**kwargs: Any) -> Any:
    """joblib calls this when a Parallel call uses the backend: only then is the executor's stack imported."""
    global _class
    _check_joblib_version()
    with _registered:
        if _class is None:
            _class = _backend_class()
    return _class(**kwargs)


_class: type | None = None


def register() -> None:
    """Register the backend with joblib (idempotent, and cheap: task processes import p2pexec too)."""
    import joblib

    joblib.register_parallel_backend(NAME, _make_backend)


class _WhenJoblibLoads(importlib.abc.MetaPathFinder):
    """Registers the backend right after ``import joblib``, wherever it happens."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "joblib":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            sys.modules[name] = module
            register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Make ``backend="p2pexec"`` available to joblib now or whenever it is imported."""
    if "joblib" in sys.modules:
        register()
    elif not any(isinstance(f, _WhenJoblibLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenJoblibLoads())
