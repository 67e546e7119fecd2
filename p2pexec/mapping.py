"""How ``map`` becomes tasks: chunks of items, their function pickled once, big shared arguments sent once.

Each task runs the user's function over ``chunksize`` numbered items
(:mod:`p2pexec.chunks`; :func:`~p2pexec.seeding.seeded_chunk` when the
executor has a seed, each item on its own random stream).  The chunk
function is pickled once for the whole call
(:class:`~p2pexec.tasks.PrepickledFunction`; a task process unpickles
it once, unless it has state of its own: :func:`stateless`), and a big
argument met in several chunks is pickled and sent once
(:func:`~p2pexec.hoisting.shared_values`).
"""

from __future__ import annotations

import types
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
                  timeout: float | None, chunksize: int, seeded: tuple[int, int] | None) -> Iterator[Any]:
    """``Executor.map`` of ``fn`` through ``submitter``, in chunks; ``seeded`` is (seed, which map call)."""
    chunks = numbered_chunks(*iterables, chunksize=chunksize)
    if seeded is None:
        chunk_task: Callable[..., Any] = partial(run_chunk, fn)
    else:
        seed, number = seeded
        chunk_task = partial(seeded_chunk, fn, seed, (1, number))
    try:
        task: Callable[..., Any] = PrepickledFunction(chunk_task, fresh=not stateless(fn))
    except Exception:
        task = chunk_task  # each submit reports the pickling error on its future
    with shared_values():  # a big argument given to every item is pickled and sent once
        results = Executor.map(submitter, task, chunks, timeout=timeout)
    return chained(results)
