"""``map``'s chunks: numbered as they are cut, run on workers (several short ones in one task), and their
results chained back in order.

Our own rather than ``concurrent.futures.process``'s private helpers: a
map's tasks name these functions in their pickles, so they must not move
with a Python release.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from typing import Any

Chunk = tuple[int, tuple[tuple[Any, ...], ...]]  # (index of its first item, the items' argument tuples)

#: The functions that run a chunk, as ``module.qualname``: a task ``partial(RUNNER, fn, ...)`` maps ``fn``.
RUNNERS = frozenset({"p2pexec.chunks.run_chunks", "p2pexec.chunks.run_chunk", "p2pexec.seeding.seeded_chunk"})
WRAPPERS = frozenset({"p2pexec.namespaces.Initialized", "p2pexec.seeding.Seeded"})  # each holds the task's .fn


def numbered_chunks(*iterables: Iterable[Any], chunksize: int) -> Iterator[Chunk]:
    """``(index of the first item, chunk)`` pairs, lazily."""
    items, start = zip(*iterables), 0
    while chunk := tuple(islice(items, chunksize)):
        yield start, chunk
        start += len(chunk)


def run_chunk(fn: Callable[..., Any], numbered: Chunk) -> list[Any]:
    """On the worker: one chunk's results, in order."""
    return [fn(*args) for args in numbered[1]]


def grouped(chunks: Iterator[Chunk], size: int) -> Iterator[list[Chunk]]:
    """``size`` chunks at a time (one task each), lazily."""
    while group := list(islice(chunks, size)):
        yield group


def run_chunks(run: Callable[[Chunk], list[Any]], chunks: list[Chunk]) -> tuple[float, list[Any]]:
    """On the worker: one task's chunks, each ending on its own as in a pool (a list of results, or the
    exception one raised), and the seconds they took, which size the map's next tasks (:mod:`p2pexec.mapping`).

    A lone chunk's exception fails the task, as a pool's would; a pool's worker reports any BaseException
    (a task process ignores SIGINT: a KeyboardInterrupt here is one the function raised)."""
    started = time.perf_counter()
    parts: list[Any] = []
    for chunk in chunks:
        try:
            parts.append(run(chunk))
        except BaseException as exc:
            if len(chunks) == 1:
                raise
            from .tasks import remote_exception  # (loaded already in a task process; this module stays pure)

            parts.append(remote_exception(exc))
    return time.perf_counter() - started, parts


def chained(results: Iterable[tuple[float, list[Any]]],
            learned: Callable[[float, list[list[Any]]], None] | None = None) -> Iterator[Any]:
    """The chunks' results one by one, in order, each list let go of as it is consumed; a chunk that
    raised raises here, once the chunks before it are through.  ``learned(seconds, parts)`` hears how long
    each task's chunks took on its worker, and their results."""
    try:
        for seconds, parts in results:
            if learned is not None and not any(isinstance(part, BaseException) for part in parts):
                learned(seconds, parts)
            parts.reverse()
            while parts:
                part = parts.pop()
                if isinstance(part, BaseException):
                    raise part
                part.reverse()
                while part:
                    yield part.pop()
    finally:  # the rest is cancelled now, not when the last reference to a kept exception goes
        close = getattr(results, "close", None)
        if close is not None:
            close()


def mapped_function(fn: Any) -> Any:
    """The user's function inside a map's chunk task, an executor's ``initializer=`` or ``seed=`` wrapper
    (and inside other partials), else ``fn``."""
    for _ in range(8):  # bounded: partials of partials
        if f"{type(fn).__module__}.{type(fn).__qualname__}" in WRAPPERS:
            fn = fn.fn
            continue
        if not isinstance(fn, partial):
            break
        runner = f"{getattr(fn.func, '__module__', '')}.{getattr(fn.func, '__qualname__', '')}"
        fn = fn.args[0] if runner in RUNNERS and fn.args else fn.func
    return fn
