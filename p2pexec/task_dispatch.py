"""What the task pickler does differently from dill, type by type (:data:`DISPATCH`).

- the user's ``Enum`` classes go by value (:mod:`p2pexec.enum_classes`);
- a module of the user's own code goes by value (no worker can import it);
- a lock or an open file in data is refused, as ProcessPoolExecutor does;
  reached through code sent by value, it is made anew, as importing that
  code would;
- a by-value function's globals become its executor's namespace
  (:mod:`p2pexec.namespaces`).

``_local_module`` is named in pickles: it stays here.
"""

from __future__ import annotations

import enum
import io
import pickle
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import dill
import dill._dill

from . import enum_classes, namespaces
from .own_code import by_reference, is_local_module


def _save_enum(pickler: Any, cls: enum.EnumMeta) -> None:
    if cls in enum_classes.rebuilt or not by_reference(cls):
        enum_classes.save_enum_class(pickler, cls)
    else:
        dill._dill.save_type(pickler, cls)


def _refuse_resource(pickler: Any, obj: Any) -> None:
    # In data, dill would send a new lock, or reopen a file by its path on the friend's machine, and the
    # task would run with it; ProcessPoolExecutor refuses both.  Reached through code sent by value (a
    # function's globals, a class's or a module's namespace), dill's way is what importing that code on
    # the worker would do (a module-level lock or log file of its own); so it is for the standard streams.
    if pickler.in_code or obj in (sys.__stdout__, sys.__stderr__, sys.__stdin__):
        dill.Pickler.dispatch[type(obj)](pickler, obj)
        return
    kind = type(obj)
    raise TypeError(f"cannot pickle {f'{kind.__module__}.{kind.__qualname__}'!r} object: a lock or an open file "
                    "belongs to this process; pass the data itself (or a file's name and open it in the task)")


def _save_module(pickler: Any, module: types.ModuleType) -> None:
    # dill names a module and sends its namespace (its whole ``__dict__``) to update the one the worker
    # imports; but a worker has no module of the user's own (``from mypkg import consts``), so one is made.
    name = module.__name__
    if name == "__main__" or not is_local_module(name):
        dill._dill.save_module(pickler, module)
        return
    state = {k: v for k, v in vars(module).items() if k not in ("__builtins__", "__loader__", "__spec__")}
    pickler.save_reduce(_local_module, (name,), state=state, obj=module)


def _local_module(name: str) -> types.ModuleType:
    """A module of the client's own code, in a task process: a namespace of its own, never imported."""
    return types.ModuleType(name)


_RESOURCES = (type(threading.Lock()), type(threading.RLock()), io.FileIO, io.BufferedReader, io.BufferedWriter,
              io.BufferedRandom, io.TextIOWrapper)


def _in_code(save: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """``save``, counting that what it pickles is reached through code (see :func:`_refuse_resource`)."""
    def saving(pickler: Any, obj: Any) -> None:
        pickler.in_code += 1
        try:
            save(pickler, obj)
        finally:
            pickler.in_code -= 1
    return saving


_save_type = _in_code(dill._dill.save_type)


class _Dispatch(dict[Any, Any]):
    """The task pickler's own entries, then dill's table (to which dill keeps adding)."""

    def get(self, key: Any, default: Any = None) -> Any:
        found = dict.get(self, key)
        if found is None:
            found = dill.Pickler.dispatch.get(key, default)
            return _save_type if found is dill._dill.save_type else found
        return found


def _save_dict(pickler: Any, obj: dict[str, Any]) -> None:
    executor = pickler.globals_of.get(id(obj))
    if executor is not None:  # a function's globals: its executor's namespace (p2pexec.namespaces)
        pickler.save_reduce(namespaces._namespace, (executor, obj["__name__"]), obj=obj)
    elif pickler.flat_in_c and len(obj) >= FLAT_MIN and all(type(k) in FLAT_ITEMS and type(v) in FLAT_ITEMS
                                                             for k, v in obj.items()):
        _save_flat(pickler, obj)
    else:
        dill._dill.save_module_dict(pickler, obj)


FLAT_MIN = 64  # items: a shorter container goes dill's way, which costs about what the check would
FLAT_ITEMS = frozenset({int, float, complex, str, bool, type(None)})  # (not bytes: big ones go out of band)


def _plain(*parts: bytes) -> Any:
    """(Named in pickles.)  A flat container that the C pickler pickled."""
    return pickle.loads(b"".join(parts))


FLAT_PART = 32 * 1024  # bytes: in-band pieces (a big buffer would go out of band, unseen by hoisting's sizes)


def _save_flat(pickler: Any, obj: Any) -> None:
    # A flat container of numbers and strings (a global lookup table, a long list among arguments that are not
    # all plain data) goes in one piece by the C pickler: dill's pure-Python pickler takes microseconds an item,
    # and a 20,000-item global cost every submit 98 ms.  Being flat, it shares nothing with the rest of the pickle.
    # Its pickle stays in this one, as dill's would, so a big one is found big and sent once (p2pexec.hoisting).
    data = pickle.dumps(obj, protocol=pickler.proto)
    parts = tuple(data[at:at + FLAT_PART] for at in range(0, len(data), FLAT_PART))
    pickler.save_reduce(_plain, parts, obj=obj)


def _save_sequence(save: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """dill's ``save`` for a list or tuple, unless it is a long flat one (:func:`_save_flat`)."""
    def saving(pickler: Any, obj: Any) -> None:
        if pickler.flat_in_c and len(obj) >= FLAT_MIN and all(type(item) in FLAT_ITEMS for item in obj):
            _save_flat(pickler, obj)
        else:
            save(pickler, obj)
    return saving


DISPATCH = _Dispatch({enum.EnumMeta: _in_code(_save_enum), types.ModuleType: _in_code(_save_module),
                      types.FunctionType: _in_code(dill._dill.save_function), dict: _save_dict,
                      list: _save_sequence(dill.Pickler.dispatch[list]),
                      tuple: _save_sequence(dill.Pickler.dispatch[tuple]),
                      **dict.fromkeys(_RESOURCES, _refuse_resource)})
