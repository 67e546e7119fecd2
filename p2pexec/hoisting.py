"""Big values hoisted out of a task: pickled on their own, named by digest, sent to each worker once.

A task's payload must stay small for the common case to be fast, and an
argument given to every item of a ``map`` (an array, a model) must not
cross once per item.  :func:`dump_task_values` finds the big parts while
pickling (``persistent_id``) and replaces them by their index among the
task's :class:`Value` s; :mod:`p2pexec.protocol.values` says how they
travel, the worker's ``valuecache`` keeps them, and
:func:`p2pexec.tasks.load_task` puts them back in the task process.
"""

from __future__ import annotations

import functools
import io
import pickle
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .protocol import values as wire
from .protocol.frames import Buffer, nbytes
from .tasks import (ATOMS, PROTOCOL, PrepickledFunction, TaskPickler, dump_payload, dump_task, is_plain,
                    numpy_array_type, pack_payload)


@dataclass(eq=False)
class Value:
    """A big argument (or function) pickled on its own, named by its digest (:mod:`p2pexec.protocol.values`)."""

    parts: list[Buffer]  # its payload, as :func:`~p2pexec.tasks.dump_payload` makes it
    digest: bytes = b""
    size: int = 0
    modules: frozenset[str] | None = None  # the modules its pickle names, once the client asked

    def __post_init__(self) -> None:
        self.digest = wire.digest(self.parts)
        self.size = sum(nbytes(p) for p in self.parts)

    @classmethod
    def of(cls, obj: Any) -> "Value":
        """``obj`` pickled as a value, laid out so that each of its buffers lands aligned on the worker."""
        return cls(dump_payload(obj, landing=wire.VALUE_AT, recurse=True))

    @property
    def pickle(self) -> Buffer:
        return self.parts[1]  # [header, pickle, out-of-band buffers...]


def _hoistable_size(obj: Any) -> int:
    """How big ``obj`` is, for the types whose size costs nothing to know; 0 for the rest."""
    kind = type(obj)
    if kind is bytes or kind is bytearray or kind is str:
        return len(obj)
    if kind is memoryview:
        return obj.nbytes if obj.c_contiguous else 0
    if kind is PrepickledFunction:
        return len(obj.data)
    array = numpy_array_type()
    return obj.nbytes if array is not None and isinstance(obj, array) else 0


class _Hoisting:
    """Which objects of a task become :class:`Value` s: found while pickling, made once per object.

    ``memo`` (id -> (object, value)) holds the object, so its id is not
    reused while the memo lives: across the tasks of one ``map`` call,
    or within one task.
    """

    def __init__(self, memo: dict[int, tuple[Any, Value]]) -> None:
        self.memo = memo
        self.used: dict[int, int] = {}  # id(value) -> its index in this task
        self.values: list[Value] = []

    def index(self, value: Value) -> int:
        """``value``'s index in this task, given on first use."""
        index = self.used.get(id(value))
        if index is None:
            index = self.used[id(value)] = len(self.values)
            self.values.append(value)
        return index

    def dump(self, obj: Any, frozen: bool = True) -> list[Buffer]:
        """``obj``'s payload; ``frozen=False`` for one only measured, never sent (its buffers are not copied)."""
        self.used, self.values = {}, []
        buf = io.BytesIO()
        buffers: list[pickle.PickleBuffer] = []
        pickler = _HoistingPickler(buf, protocol=PROTOCOL, buffer_callback=buffers.append, recurse=True)
        pickler.hoisting, pickler.memo_of_values = self, self.memo
        pickler.dump(obj)
        return pack_payload(buf, buffers, frozen=frozen)


_NEVER_BIG_ALONE = frozenset({int, float, bool, complex, type(None), tuple, list, dict, set, frozenset, type,
                              types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.CellType,
                              types.ModuleType, functools.partial})


class _HoistingPickler(TaskPickler):
    """Replaces big objects by their index among the task's values (``persistent_id``, asked of every object
    pickled: kept short)."""

    hoisting: _Hoisting
    memo_of_values: dict[int, tuple[Any, Value]]

    def persistent_id(self, obj: Any) -> int | None:
        if self.memo_of_values:
            hit = self.memo_of_values.get(id(obj))
            if hit is not None:
                return self.hoisting.index(hit[1])
        kind = type(obj)
        if kind in _NEVER_BIG_ALONE:
            return None
        if kind is str or kind is bytes:
            if len(obj) < wire.HOIST_MIN:
                return None
        elif _hoistable_size(obj) < wire.HOIST_MIN:
            return None
        value = Value.of(obj)
        self.memo_of_values[id(obj)] = (obj, value)
        return self.hoisting.index(value)


_shared = threading.local()


@contextmanager
def shared_values(known: dict[int, tuple[Any, Value]] | None = None) -> Iterator[None]:
    """Within this block (one ``map`` call) the same big object, met again, is the same value: pickled once.

    Nothing else runs in this thread meanwhile, so what it holds cannot change in between.  ``known``: big
    objects whose values are made already (an executor's initializer), added to an enclosing block's.
    """
    outer = getattr(_shared, "memo", None)
    if outer is not None:
        outer.update(known or {})
        yield
        return
    _shared.memo = dict(known or {})
    try:
        yield
    finally:
        _shared.memo = outer


def _components(task: tuple[Any, ...], limit: int = 256) -> list[Any]:
    """The parts of a task that may be big on their own: its function, and its arguments through tuples
    (a map's chunks are tuples of argument tuples) and keyword dicts, at most ``limit`` of them."""
    out: list[Any] = []
    stack = [task]
    while stack and len(out) < limit:
        item = stack.pop()
        kind = type(item)
        if (kind is tuple and len(item) <= limit) or item is task:
            stack.extend(reversed(item))
        elif kind is dict and item is task[2]:
            stack.extend(item.values())
        elif kind not in ATOMS or _hoistable_size(item):
            out.append(item)
    return out


def dump_task_values(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                     plain: bool | None = None) -> tuple[list[Buffer], tuple[Value, ...]]:
    """The task's payload and the big values it refers to, which travel beside it.

    Bytes-like objects, NumPy arrays, strings and map functions of
    :data:`~p2pexec.protocol.values.HOIST_MIN` bytes or more are found as
    they are pickled (their size costs nothing to know).  Other objects
    are only looked at when the task's own pickle came out that big: then
    its function and each argument (through tuples, which is where a
    map's items are) is pickled once more to find the big ones, and the
    task again without them, so at most three picklings, and only for
    tasks big enough that sending them costs far more.
    """
    if plain is None:
        plain = is_plain((args, kwargs))
    memo = getattr(_shared, "memo", None)
    if plain and not memo and (not isinstance(fn, PrepickledFunction) or len(fn.data) < wire.HOIST_MIN):
        payload = dump_task(fn, args, kwargs, plain)
        if nbytes(payload[1]) < wire.HOIST_MIN:
            return payload, ()
    hoisting = _Hoisting({} if memo is None else memo)
    task = (fn, args, kwargs)
    payload = hoisting.dump(task)
    if nbytes(payload[1]) >= wire.HOIST_MIN:  # big in its own pickle: which parts make it so?
        probe = _Hoisting(hoisting.memo)
        for part in _components(task):
            if id(part) not in hoisting.memo and nbytes(probe.dump(part, frozen=False)[1]) >= wire.HOIST_MIN:
                hoisting.memo[id(part)] = (part, Value.of(part))
        payload = hoisting.dump(task)
    return payload, tuple(hoisting.values)
