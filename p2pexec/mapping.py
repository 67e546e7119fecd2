"""How ``map`` becomes tasks: chunks of items, their function pickled once, big shared arguments sent once.

Each task runs the user's function over ``chunksize`` numbered items
(:mod:`p2pexec.chunks`; :func:`~p2pexec.seeding.seeded_chunk` when the
executor has a seed, each item on its own random stream).  The chunk
function is pickled once for the whole call
(:class:`~p2pexec.tasks.PrepickledFunction`), and a big argument met in
several chunks is pickled and sent once
(:func:`~p2pexec.hoisting.shared_values`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from functools import partial
from typing import Any

from .chunks import chained, numbered_chunks, run_chunk
from .hoisting import shared_values
from .seeding import seeded_chunk
from .tasks import PrepickledFunction


def is_map_chunk(fn: Any) -> bool:
    """Is ``fn`` one of :func:`map_in_chunks`' tasks (which number their own items for seeding)?"""
    return isinstance(fn, PrepickledFunction) or (
        isinstance(fn, partial) and fn.func in (run_chunk, seeded_chunk))


def map_in_chunks(submitter: Executor, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                  timeout: float | None, chunksize: int, seeded: tuple[int, int] | None) -> Iterator[Any]:
    """``Executor.map`` of ``fn`` through ``submitter``, in chunks; ``seeded`` is (seed, which map call)."""
    chunks = numbered_chunks(*iterables, chunksize=chunksize)
    if seeded is None:
        chunk_task: Callable[..., Any] = partial(run_chunk, fn)
    else:
        seed, number = seeded
        chunk_task = partial(seeded_chunk, fn, seed, (1, number))
    try:
        task: Callable[..., Any] = PrepickledFunction(chunk_task)
    except Exception:
        task = chunk_task  # each submit reports the pickling error on its future
    with shared_values():  # a big argument given to every item is pickled and sent once
        results = Executor.map(submitter, task, chunks, timeout=timeout)
    return chained(results)
