"""How ``map`` becomes tasks: chunks of items, short ones together, their function pickled once, big shared
arguments sent once.

Each chunk runs the user's function over ``chunksize`` numbered items
(:mod:`p2pexec.chunks`; :func:`~p2pexec.seeding.seeded_chunk` when the
executor has a seed, each item on its own random stream).  A task carries
one chunk, or several when the map's first chunks showed its items short
(:func:`_probe`; and its function's earlier maps, if they were slower:
:class:`Paces`): a task costs a worker and the client a fixed
fraction of a millisecond, as much as hundreds of tiny items, and the
results, exceptions and random streams are those of one chunk a task.
The chunk function is pickled once for the whole call
(:class:`~p2pexec.tasks.PrepickledFunction`; a task process unpickles
it once, unless it has state of its own: :func:`stateless`), and a big
argument met in several chunks is pickled and sent once
(:func:`~p2pexec.hoisting.shared_values`).
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from functools import partial
from typing import Any

from .chunks import Chunk, chained, grouped, numbered_chunks, run_chunk, run_chunks
from .hoisting import shared_values
from .seeding import seeded_chunk
from .tasks import PrepickledFunction


#: A task of several chunks is planned to run about this long at most, so that it delays neither the map's
#: first results nor its last (when the other slots are done) by more.
TASK_SECONDS = 0.005
MOST_CHUNKS = 64  # in one task, whatever the estimate (a wrong one costs at most this many chunks' time)
#: A map grouped into fewer tasks than this (or than four a slot the executor knows of) would leave slots
#: idle if its items were slower than they seemed.
FEWEST_TASKS = 32
TASK_BYTES = 1 << 18  # of arguments, or of results, in one task, as estimated from a chunk's
SAMPLED = 16  # items or results whose sizes are summed, to estimate one's
MOST_PACES = 256  # functions whose pace an executor remembers
#: A map long enough to group sends its first PROBES chunks alone, then waits up to PROBE_SECONDS for one
#: of them: the pace of its own items, not only of its function's earlier maps, decides how it is grouped.
PROBES = 4
PROBE_SECONDS = 0.25

Pace = tuple[float, float]  # seconds and result bytes an item


class Paces:
    """How long one item of each mapped function takes on a worker and how big its result is, as its tasks
    said (averages that follow change), and so how many of a map's chunks one task carries."""

    def __init__(self) -> None:
        self._paces: dict[Any, Pace] = {}  # by function (code object: a lambda made anew in a loop is one)
        self._lock = threading.Lock()  # (maps are made and read on any of the user's threads)

    def learner(self, fn: Callable[..., Any]) -> Callable[[float, list[list[Any]]], None]:
        """What hears each task's seconds and its chunks' results (:func:`~p2pexec.chunks.chained`)."""
        key = _pace_key(fn)

        def learn(seconds: float, parts: list[list[Any]]) -> None:
            now = pace_of(seconds, parts)
            if now is None:
                return
            with self._lock:
                was = self._paces.pop(key, None)
                self._paces[key] = now if was is None else (0.7 * was[0] + 0.3 * now[0], 0.7 * was[1] + 0.3 * now[1])
                if len(self._paces) > MOST_PACES:
                    del self._paces[next(iter(self._paces))]  # the one least recently learned from
        return learn

    def grouping(self, fn: Callable[..., Any], chunks: Iterator[Chunk], probed: Pace | None,
                 fewest: int) -> tuple[int, Iterator[Chunk]]:
        """How many of ``chunks`` one task carries, and the chunks (a few read ahead): one, unless ``fn``'s
        items were ``probed`` short in this map (and, if its earlier maps were slower, there too); then as
        many as fit in TASK_SECONDS and in TASK_BYTES of arguments (the first chunk's) or results, up to
        MOST_CHUNKS, and so that there are ``fewest`` tasks or more."""
        if probed is None:
            return 1, chunks
        with self._lock:
            known = self._paces.get(_pace_key(fn))
        seconds, result_bytes = probed if known is None else map(max, probed, known)
        head = list(itertools.islice(chunks, MOST_CHUNKS * fewest))
        if not head:
            return 1, chunks
        items = head[0][1]
        sample = items[:SAMPLED]
        argument_bytes = sum(_size(arg) for args in sample for arg in args) * len(items) / len(sample)
        per_task = min(MOST_CHUNKS, int(TASK_SECONDS / max(seconds * len(items), 1e-9)),
                       int(TASK_BYTES / max(argument_bytes, result_bytes * len(items), 1)), len(head) // fewest)
        return max(1, per_task), itertools.chain(head, chunks)


def pace_of(seconds: float, parts: list[list[Any]]) -> Pace | None:
    """The pace one task's chunks (``parts``, their results) showed, if it ran any item."""
    items = sum(map(len, parts))
    if not items:
        return None
    sample = next(part for part in parts if part)[:SAMPLED]
    return seconds / items, sum(map(_size, sample)) / len(sample)


def _size(obj: Any) -> float:
    """Bytes of ``obj`` and, for a list, tuple or dict, of its first SAMPLED items (scaled to all): a floor."""
    size: float = sys.getsizeof(obj)
    kind = type(obj)
    if kind is list or kind is tuple or kind is dict:
        sample = list(itertools.islice(obj.values() if kind is dict else obj, SAMPLED))
        if sample:
            size += sum(map(sys.getsizeof, sample)) * len(obj) / len(sample)
    return size


def _pace_key(fn: Callable[..., Any]) -> Any:
    return getattr(fn, "__code__", fn)


def is_map_chunk(fn: Any) -> bool:
    """Is ``fn`` one of :func:`map_in_chunks`' tasks (which number their own items for seeding)?"""
    return isinstance(fn, PrepickledFunction) or (isinstance(fn, partial) and fn.func is run_chunks)


def stateless(fn: Any) -> bool:
    """Does ``fn`` carry no state of its own, so that a task process may keep one copy for every chunk?

    A function, a class, a builtin (not a method of some object); not a
    bound method, a ``partial`` or a callable object: ProcessPoolExecutor
    pickles those with each chunk, so each chunk starts from the client's
    state, and so does p2pexec.
    """
    kind = type(fn)
    if kind is types.BuiltinFunctionType:
        return fn.__self__ is None or type(fn.__self__) is types.ModuleType
    return kind is types.FunctionType or isinstance(fn, type)


def map_in_chunks(submitter: Executor, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                  timeout: float | None, chunksize: int, seeded: tuple[int, int] | None,
                  paces: Paces | None, slots: Callable[[], int]) -> Iterator[Any]:
    """``Executor.map`` of ``fn`` through ``submitter``, in chunks; ``seeded`` is (seed, which map call);
    ``paces`` None: one chunk a task (each must count, or be timed, on its own); ``slots()``: how many
    the executor knows of."""
    end = None if timeout is None else time.monotonic() + timeout
    chunks = numbered_chunks(*iterables, chunksize=chunksize)
    if seeded is None:
        chunk_task: Callable[..., Any] = partial(run_chunk, fn)
    else:
        seed, number = seeded
        chunk_task = partial(seeded_chunk, fn, seed, (1, number))
    task: Callable[..., Any] = partial(run_chunks, chunk_task)
    fresh = not stateless(fn)
    try:
        task = PrepickledFunction(task, fresh=fresh)
    except Exception:
        pass  # each submit reports the pickling error on its future
    learn = None if paces is None or fresh else paces.learner(fn)  # (state of its own: each chunk afresh)
    with shared_values():  # a big argument given to every item is pickled and sent once
        futures: list[Future[Any]] = []
        per_task = 1
        head = list(itertools.islice(chunks, PROBES + 2 * FEWEST_TASKS))
        chunks = itertools.chain(head, chunks)
        if paces is not None and learn is not None and len(head) == PROBES + 2 * FEWEST_TASKS:
            fewest = max(FEWEST_TASKS, 4 * slots())  # (asked only of a map long enough to group)
            futures, probed, chunks = _probe(submitter, task, chunks, fewest, end)
            per_task, chunks = paces.grouping(fn, chunks, probed, fewest)
        futures += [submitter.submit(task, group) for group in grouped(chunks, per_task)]
    return chained(_in_order(futures, end), learn)


def _probe(submitter: Executor, task: Callable[..., Any], chunks: Iterator[Chunk], fewest: int,
           end: float | None) -> tuple[list[Future[Any]], Pace | None, Iterator[Chunk]]:
    """In a map long enough to group, its first PROBES chunks go at once, one a task: their futures, the pace
    of the first back within PROBE_SECONDS (None: none was), and the chunks left."""
    head = list(itertools.islice(chunks, PROBES + 2 * fewest))
    if len(head) < PROBES + 2 * fewest:
        return [], None, iter(head)
    futures = [submitter.submit(task, [chunk]) for chunk in head[:PROBES]]
    patience = PROBE_SECONDS if end is None else min(PROBE_SECONDS, end - time.monotonic())
    done, _ = wait(futures, max(0.0, patience), return_when=FIRST_COMPLETED)
    paces = [pace for future in done if not future.cancelled() and future.exception() is None
             if (pace := pace_of(*future.result())) is not None]
    return futures, max(paces, default=None), itertools.chain(head[PROBES:], chunks)


def _in_order(futures: list[Future[Any]], end: float | None) -> Iterator[Any]:
    """The futures' results in order, as ``Executor.map`` yields them: each within the map's ``timeout``
    (else it is cancelled), the rest cancelled when the iterator is closed or dropped."""
    try:
        futures.reverse()
        while futures:
            future = futures.pop()
            try:
                yield future.result(None if end is None else end - time.monotonic())
            finally:
                future.cancel()
                del future
    finally:
        for future in futures:
            future.cancel()
