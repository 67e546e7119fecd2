"""``map``'s chunks: numbered as they are cut, run on workers, and their results chained back in order.

Our own rather than ``concurrent.futures.process``'s private helpers: a
map's tasks name these functions in their pickles, so they must not move
with a Python release.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from typing import Any

Chunk = tuple[int, tuple[tuple[Any, ...], ...]]  # (index of its first item, the items' argument tuples)

#: The functions that run a chunk, as ``module.qualname``: a task ``partial(RUNNER, fn, ...)`` maps ``fn``.
RUNNERS = frozenset({"p2pexec.chunks.run_chunk", "p2pexec.seeding.seeded_chunk"})


def numbered_chunks(*iterables: Iterable[Any], chunksize: int) -> Iterator[Chunk]:
    """``(index of the first item, chunk)`` pairs, lazily."""
    items, start = zip(*iterables), 0
    while chunk := tuple(islice(items, chunksize)):
        yield start, chunk
        start += len(chunk)


def run_chunk(fn: Callable[..., Any], numbered: Chunk) -> list[Any]:
    """On the worker: one chunk's results, in order."""
    return [fn(*args) for args in numbered[1]]


def chained(results: Iterable[list[Any]]) -> Iterator[Any]:
    """The chunks' results one by one, each chunk's list let go of as it is consumed."""
    for chunk in results:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


def mapped_function(fn: Any) -> Any:
    """The user's function inside a map's chunk task (and inside other partials), else ``fn``."""
    for _ in range(8):  # bounded: partials of partials
        if not isinstance(fn, partial):
            break
        runner = f"{getattr(fn.func, '__module__', '')}.{getattr(fn.func, '__qualname__', '')}"
        fn = fn.args[0] if runner in RUNNERS and fn.args else fn.func
    return fn
