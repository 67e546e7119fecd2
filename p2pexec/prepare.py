"""A submitted call's payload, in a few microseconds when it can be: :func:`prepare_task`.

The client's per-task entry (``submit`` and each ``map`` chunk).  Most
tasks are a function and builtin data; those go through the C pickler
once.  That needs the function in a form the C pickler can carry: named
by reference, or pickled by value once and reused while nothing it was
pickled from changed (:func:`prepickled`, checked by a snapshot of the
objects it was pickled from).  Everything else takes
:func:`p2pexec.hoisting.dump_task_values`' way.
"""

from __future__ import annotations

import logging
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from . import namespaces
from .hoisting import Value, dump_task_values
from .namespaces import Initialized
from .own_code import by_reference, is_local_module
from .protocol import values as wire
from .protocol.frames import Buffer, pack_parts
from .tasks import OUT_OF_BAND, PrepickledFunction, has_big_bytes, is_plain, plain_pickle


Prepared = tuple[list[Buffer], tuple[Value, ...], bool]  # payload, big values, whether the arguments are plain


def prepare_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
    """A task's payload and big values (:func:`dump_task_values`), and whether its arguments are plain data.

    The common cases go through :func:`plain_task`; everything else takes
    :func:`full_task`'s way.
    """
    payload = plain_task(fn, args, kwargs)
    return (payload, (), True) if payload is not None else full_task(fn, args, kwargs)


def full_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
    """:func:`prepare_task` for a task :func:`plain_task` has refused already (not tried again)."""
    plain = is_plain((args, kwargs))
    payload, values = dump_task_values(fn, args, kwargs, plain)
    return payload, values, plain


def plain_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Buffer] | None:
    """The payload of a task whose arguments are builtin data (so no Future is among them either), in a few
    microseconds; None for any other task.

    A ``map`` chunk or a function pickled by value (:func:`prepickled`,
    unchanged since it was last pickled), with builtin data as arguments,
    goes through the C pickler once.
    """
    if isinstance(fn, Initialized):
        carried = _carried(fn.fn)
        small = carried is not None and type(fn.initializer) is PrepickledFunction
        task: Any = Initialized(carried, fn.initializer, fn.executor) if small else None  # (the C pickler takes both)
    else:
        carried = task = _carried(fn)
    if task is not None and not has_big_bytes(*args, *kwargs.values()):
        main = plain_pickle((task, args, kwargs), carried)
        if main is not None and len(main) < wire.HOIST_MIN and (len(main) < OUT_OF_BAND or is_plain((args, kwargs))):
            return pack_parts([main])  # (big bytes must go out of band: is_plain refuses them)
    return None


def _carried(fn: Callable[..., Any]) -> Any:
    """``fn`` in a form the C pickler carries as dill would, or None."""
    if type(fn) is PrepickledFunction:
        return fn if len(fn.data) < OUT_OF_BAND else None
    if type(fn) is types.BuiltinFunctionType:
        return fn if _stable(fn, [], set()) else None  # len, math.sqrt: by name
    if type(fn) is types.FunctionType:
        carried = prepickled(fn)
        if carried is None and by_reference(fn):
            return fn  # the C pickler names it as dill would
        return carried if carried is not None and len(carried.data) < OUT_OF_BAND else None
    return None


# -- functions pickled by value, once while they stay the same ------------------------------------------------
_ABSENT = object()
_by_value: "weakref.WeakKeyDictionary[Callable[..., Any], tuple[tuple[Any, ...], PrepickledFunction, str | None]]" \
    = weakref.WeakKeyDictionary()
_by_value_lock = threading.Lock()


def prepickled(fn: types.FunctionType) -> PrepickledFunction | None:
    """``fn`` pickled by value (as :func:`~p2pexec.tasks.dump_task` would), reused while nothing it was
    pickled from changed.

    Pickling a function of ``__main__``, a notebook or a local module
    costs hundreds of microseconds (dill's pure-Python pickler), more
    than the rest of a small task's round trip.  The pickle depends only
    on the function's code, defaults, closure, attributes and the globals
    its code names (recursively, for functions pickled by value too).
    Such a function is pickled once and reused only while each of those
    is the very same object *and* immutable (numbers, strings, None) or
    pickled by reference (modules, installed functions and classes):
    then the pickle would come out the same.  A function that refers to
    anything else (a list, a dict, a class of ``__main__``) is pickled
    every time, as before.  None when ``fn`` is pickled by reference, or
    not cacheable.  Each task still unpickles its own copy (``fresh``).
    """
    executor = namespaces.current()  # (its globals are this executor's namespace: part of the pickle)
    with _by_value_lock:
        hit = _by_value.get(fn)
    if hit is not None and hit[2] == executor and _unchanged(hit[0]):
        return hit[1]
    if by_reference(fn):
        return None
    snapshot: list[Any] = []
    if not _snapshot(fn, snapshot, set()):
        return None
    try:
        made = PrepickledFunction(fn, fresh=True)
    except Exception:
        return None  # dump_task reports it
    with _by_value_lock:
        if len(_by_value) >= MOST_CACHED:  # (a program making new functions all the time: lambdas in a loop)
            _by_value.clear()
        _by_value[fn] = (tuple(snapshot), made, executor)
    return made


MOST_CACHED = 1024  # functions pickled once and kept; a function's entry holds it only weakly


_STABLE_TYPES = frozenset({int, float, complex, str, bool, type(None)})


def _stable(obj: Any, snapshot: list[Any], seen: set[int]) -> bool:
    """Is ``obj`` pickled the same while it is the same object?  A function pickled by value is, if
    everything it is pickled from is (its checks go into ``snapshot``)."""
    kind = type(obj)
    if kind in _STABLE_TYPES:
        return True
    if kind is bytes:
        return len(obj) < OUT_OF_BAND
    if kind is tuple:
        return all(_stable(item, snapshot, seen) for item in obj)
    if kind is types.ModuleType:  # installed ones are named; the user's own travel by value (task_dispatch)
        return obj.__name__ != "__main__" and (not is_local_module(obj.__name__) or
                                               _namespace(obj, snapshot, seen, _MODULE_SKIPS))
    if kind is types.BuiltinFunctionType:  # len, math.sqrt: by name; not a method of some object ([].append)
        return getattr(obj, "__self__", None) is None or type(obj.__self__) is types.ModuleType
    if kind is types.FunctionType:
        return by_reference(obj) or _snapshot(obj, snapshot, seen)
    if isinstance(obj, logging.Logger):  # reduced to getLogger(its name)
        if kind.__reduce__ is not logging.Logger.__reduce__:
            return False
        snapshot.append(_Attributes(obj, ("name",)))
        return True
    if kind in _WRAPPERS:
        names = _WRAPPERS[kind]
        if not all(_stable(getattr(obj, name), snapshot, seen) for name in names):
            return False
        snapshot.append(_Attributes(obj, names))
        return True
    if isinstance(obj, type):  # a plain class of the user's code goes by value, as its namespace says
        return by_reference(obj) or (kind is type and all(_stable(base, snapshot, seen) for base in obj.__bases__)
                                     and _namespace(obj, snapshot, seen, _CLASS_SKIPS))
    return False


_WRAPPERS = {staticmethod: ("__func__",), classmethod: ("__func__",), property: ("fget", "fset", "fdel", "__doc__")}
_MODULE_SKIPS = frozenset({"__builtins__", "__loader__", "__spec__"})  # not in a module's pickle (task_dispatch)
_CLASS_SKIPS = frozenset({"__dict__", "__weakref__"})  # (dill leaves out these descriptors)


class _Attributes:
    """Attributes of an object that its pickle is made of: it pickles the same while each is the same object."""

    __slots__ = ("owner", "names", "values")

    def __init__(self, owner: Any, names: tuple[str, ...]) -> None:
        self.owner, self.names = owner, names
        self.values = tuple(getattr(owner, name, None) for name in names)

    def unchanged(self) -> bool:
        return all(getattr(self.owner, name, None) is value for name, value in zip(self.names, self.values))


class _Namespace(_Attributes):
    """A module's or class's namespace too: each name must hold the same object (each one stable)."""

    __slots__ = ("items",)

    def __init__(self, owner: Any) -> None:
        super().__init__(owner, ("__name__", "__qualname__", "__bases__", "__class__"))
        self.items = tuple(vars(owner).items())

    def unchanged(self) -> bool:
        now = vars(self.owner)
        return (len(now) == len(self.items) and all(now.get(k, _ABSENT) is v for k, v in self.items)
                and super().unchanged())


def _namespace(owner: Any, snapshot: list[Any], seen: set[int], skips: frozenset[str]) -> bool:
    """Add a module's or class's namespace to ``snapshot``; False if something in it may change in place."""
    if id(owner) in seen:
        return True
    seen.add(id(owner))
    if not all(name in skips or _stable(value, snapshot, seen) for name, value in vars(owner).items()):
        return False
    snapshot.append(_Namespace(owner))
    return True


def _code_names(code: types.CodeType) -> set[str]:
    """Every name the code and the code nested in it may look up (a superset of its globals)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if type(const) is types.CodeType:
            names |= _code_names(const)
    return names


def _snapshot(fn: types.FunctionType, snapshot: list[Any], seen: set[int]) -> bool:
    """Add what ``fn``'s pickle depends on to ``snapshot``; False if some of it may change in place."""
    if id(fn) in seen:
        return True
    seen.add(id(fn))
    if fn.__dict__:
        return False
    kwdefaults = fn.__kwdefaults__
    notes = fn.__annotations__
    cells: list[Any] = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:
            return False  # an empty cell (filled later)
    fixed = [fn.__defaults__ or (), *(kwdefaults or {}).values(), *notes.values(), *cells]
    if not all(_stable(item, snapshot, seen) for item in fixed):
        return False
    globs, builtins_ = fn.__globals__, getattr(fn, "__builtins__")  # (a dict, on functions)
    names = []
    for name in sorted(_code_names(fn.__code__)):
        value = globs.get(name, _ABSENT)
        builtin = builtins_.get(name, _ABSENT) if value is _ABSENT else _ABSENT
        for found in (value, builtin):
            if found is not _ABSENT and not _stable(found, snapshot, seen):
                return False
        names.append((name, value, builtin))
    snapshot.append((weakref.ref(fn), fn.__code__, fn.__defaults__, kwdefaults, tuple((kwdefaults or {}).items()),
                     notes, tuple(notes.items()), fn.__closure__, tuple(cells), fn.__name__, fn.__qualname__,
                     fn.__module__, fn.__doc__, tuple(names)))
    return True


def _unchanged(snapshot: tuple[Any, ...]) -> bool:
    """Is every object the snapshot's functions, modules and classes were pickled from still the same one?"""
    for entry in snapshot:
        if isinstance(entry, _Attributes):
            if not entry.unchanged():
                return False
            continue
        (ref, code, defaults, kwdefaults, kwitems, notes, noteitems, closure, cells, name, qualname, module,
         doc, names) = entry
        fn = ref()
        if (fn is None or fn.__code__ is not code or fn.__defaults__ is not defaults
                or fn.__kwdefaults__ is not kwdefaults
                or fn.__annotations__ is not notes or fn.__closure__ is not closure or fn.__dict__
                or fn.__name__ is not name or fn.__qualname__ is not qualname or fn.__module__ is not module
                or fn.__doc__ is not doc):
            return False
        if kwitems and (len(kwdefaults) != len(kwitems)
                        or any(kwdefaults.get(k, _ABSENT) is not v for k, v in kwitems)):
            return False
        if noteitems and (len(notes) != len(noteitems) or any(notes.get(k, _ABSENT) is not v for k, v in noteitems)):
            return False
        for cell, value in zip(closure or (), cells):
            try:
                if cell.cell_contents is not value:
                    return False
            except ValueError:
                return False
        globs, builtins_ = fn.__globals__, getattr(fn, "__builtins__")  # (a dict, on functions)
        for key, value, builtin in names:
            if globs.get(key, _ABSENT) is not value or (value is _ABSENT
                                                        and builtins_.get(key, _ABSENT) is not builtin):
                return False
    return True
