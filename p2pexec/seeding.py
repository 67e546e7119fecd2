"""Reproducible random numbers, whoever runs a task: each task's stream comes from the executor's seed and
the task's place in submission order, nothing else.

The scheme (documented, so results can be reproduced without p2pexec):
the ``k``-th ``submit`` call (from 0) has the key ``(0, k)``, item ``i`` of
the ``m``-th ``map`` call has ``(1, m, i)``; the task's
:func:`task_seed` is ``numpy.random.SeedSequence(seed, spawn_key=key)``
and :func:`task_rng` a ``numpy.random.Generator(PCG64(task_seed()))``,
made at its first call in the task and the same object for the task's
other calls (so they continue one stream).
Before the function runs, Python's ``random`` is seeded with the 128-bit
BLAKE2b hash of ``seed`` and ``key``, and NumPy's legacy global generator
(where NumPy is installed) with 8 words of ``task_seed().generate_state``.
Workers, slots, ``chunksize``, completion order and retries change none of it.

Task processes serve many tasks, so a seeded task's state must not outlive
it: afterwards ``_current`` is cleared and ``random`` and NumPy's legacy
global generator are reseeded from ``os.urandom``, so the next unseeded
task draws fresh numbers (not the seeded stream's continuation, which two
processes that ran the same seeded task would share).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

_current: tuple[int, tuple[int, ...]] | None = None  # (seed, key) of the task running in this process
_rng: Any = None  # that task's Generator, made on its first task_rng()


def python_seed(seed: int, key: tuple[int, ...]) -> int:
    """The integer Python's ``random`` is seeded with for ``key``."""
    text = f"p2pexec/random/v1 {seed} {','.join(map(str, key))}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "big")


def _enter(seed: int, key: tuple[int, ...]) -> None:
    global _current, _rng
    _current, _rng = (seed, key), None
    random.seed(python_seed(seed, key))
    numpy = _numpy()
    if numpy is not None:
        numpy.random.seed(numpy.random.SeedSequence(seed, spawn_key=key).generate_state(8))


def _leave() -> None:
    """After a seeded task (or chunk): no stream of it stays behind for the next task of this process."""
    global _current, _rng
    _current, _rng = None, None
    random.seed(os.urandom(32))
    numpy = _numpy()
    if numpy is not None:
        numpy.random.seed(numpy.frombuffer(os.urandom(32), dtype=numpy.uint32))


@functools.cache
def _numpy() -> Any:
    """NumPy where the worker has it, looked for once per task process (a failed import is slow)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def task_seed() -> Any:
    """This task's ``numpy.random.SeedSequence`` (inside a task of an executor created with ``seed=``)."""
    if _current is None:
        raise RuntimeError("task_seed() is for tasks of a P2PExecutor created with seed=...")
    import numpy

    return numpy.random.SeedSequence(_current[0], spawn_key=_current[1])


def task_rng() -> Any:
    """This task's ``numpy.random.Generator``: one per task, so successive calls continue its stream."""
    global _rng
    if _rng is None:
        import numpy

        _rng = numpy.random.Generator(numpy.random.PCG64(task_seed()))
    return _rng


class Seeded:
    """A task function that first sets up its task's random state (one ``submit``)."""

    __slots__ = ("fn", "seed", "key")

    def __init__(self, fn: Callable[..., Any], seed: int, key: tuple[int, ...]) -> None:
        self.fn, self.seed, self.key = fn, seed, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _enter(self.seed, self.key)
        try:
            return self.fn(*args, **kwargs)
        finally:
            _leave()

    def __reduce__(self) -> tuple[Any, ...]:
        return Seeded, (self.fn, self.seed, self.key)


def seeded_chunk(fn: Callable[..., Any], seed: int, prefix: tuple[int, ...],
                 numbered: tuple[int, Iterable[tuple[Any, ...]]]) -> list[Any]:
    """Run one ``map`` chunk, each item on its own stream (so ``chunksize`` changes nothing)."""
    start, chunk = numbered
    out = []
    try:
        for offset, args in enumerate(chunk):
            _enter(seed, (*prefix, start + offset))
            out.append(fn(*args))
    finally:
        _leave()
    return out
