"""Module globals that last, per executor, in a task process: what a ProcessPoolExecutor's worker keeps.

dill gives a function sent by value (of ``__main__``, a notebook, a local
module) a globals dict of its own, filled with the globals it uses.  So a
task's ``global MODEL; MODEL = load()`` was gone by the next task, and an
``initializer`` could prepare nothing for later ones.  Pickled while an
executor's :func:`sending_for` is in effect, those dicts stand for that
executor's namespace of the module (:func:`_namespace`): in a task
process, every function of the module then shares one dict, which lasts
for the executor's later tasks there, as a worker process's module does.
A global the client sends again replaces the worker's value unless code on
the worker rebound it since (:class:`Namespace`): the client's new
constant arrives, an initializer's model stays.
"""

from __future__ import annotations

import pickle
import secrets
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

_sending_for: ContextVar[str | None] = ContextVar("p2pexec_namespace", default=None)
KEEP_EXECUTORS = 16  # a task process keeps the namespaces of this many executors (the latest used)
_ABSENT = object()


class sending_for:  # noqa: N801  (used as a context manager, like contextlib.suppress)
    """While in effect, functions pickled by value go into ``executor``'s namespaces."""

    __slots__ = ("executor", "_token")

    def __init__(self, executor: str | None) -> None:
        self.executor = executor

    def __enter__(self) -> None:
        self._token: Token[str | None] = _sending_for.set(self.executor)

    def __exit__(self, *exc_info: object) -> None:
        _sending_for.reset(self._token)


def current() -> str | None:
    """The executor whose namespaces functions pickled now go into, if any."""
    return _sending_for.get()


class Namespace(dict[str, Any]):
    """A module's globals in a task process, for one executor.

    The unpickler fills it through ``__setitem__`` (dill's ``_setitems``)
    with the globals a function brought; code running here stores with
    ``STORE_GLOBAL``, which bypasses it.  A value is replaced only while
    it is still the one the client sent last, and only if the client's
    has changed since (by its :func:`fingerprint`), so what code here
    changed in place in it (a cache filled, a list an initializer
    extended) stays.
    """

    def __init__(self, name: str) -> None:
        super().__init__(__name__=name)
        self.sent: dict[str, Any] = {}
        self.prints: dict[str, bytes | None] = {}  # of what the client sent last, as it arrived

    def __setitem__(self, key: str, value: Any) -> None:
        here, print_ = self.get(key, _ABSENT), fingerprint(value)
        if here is not _ABSENT and (here is not self.sent.get(key, _ABSENT)  # rebound here: kept
                                    or print_ is not None and print_ == self.prints.get(key)):  # same as before
            return
        dict.__setitem__(self, key, value)
        self.sent[key], self.prints[key] = value, print_


_PRINTED_MAX = 1 << 16  # bytes of a pickle: a bigger value is taken anew each time


def fingerprint(value: Any) -> bytes | None:
    """What ``value`` is, as data (its pickle, by the C pickler), or None: too big, not data (a function, a
    class, a module), or holding buffers apart (a NumPy array)."""
    if type(value) in _CODE:
        return None
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=_refuse)
    except Exception:
        return None
    return data if len(data) <= _PRINTED_MAX else None


_CODE = frozenset({types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type})


def _refuse(_: Any) -> bool:
    raise pickle.PicklingError("a buffer apart")


class _Executor:
    """What a task process keeps of one executor: its modules' namespaces, the classes its tasks brought, and
    whether its initializer ran."""

    def __init__(self) -> None:
        self.modules: dict[str, Namespace] = {}
        self.classes: dict[str, type] = {}  # by the client's key for each
        self.initialized = False


_executors: OrderedDict[str, _Executor] = OrderedDict()


def _of(executor: str) -> _Executor:
    kept = _executors.get(executor)
    if kept is None:
        kept = _executors[executor] = _Executor()
        while len(_executors) > KEEP_EXECUTORS:
            _executors.popitem(last=False)
    else:
        _executors.move_to_end(executor)
    return kept


def _namespace(executor: str, module: str) -> Namespace:
    """(Named in pickles.)  ``executor``'s namespace of ``module`` in this task process."""
    modules = _of(executor).modules
    found = modules.get(module)
    if found is None:
        found = modules[module] = Namespace(module)
    return found


_class_keys: "weakref.WeakKeyDictionary[type, str]" = weakref.WeakKeyDictionary()


def class_key(cls: type) -> str:
    """On the client: names ``cls`` (this very class object) for :func:`_same_class`."""
    key = _class_keys.get(cls)
    if key is None:
        key = _class_keys.setdefault(cls, secrets.token_hex(8))
    return key


def _same_class(executor: str, key: str, make: Callable[..., type], *args: Any) -> type:
    """(Named in pickles.)  The class the client's class ``key`` is in this task process for ``executor``: made
    by ``make(*args)`` the first time, the same one for every later task.  So an object the initializer or a
    task kept in a global is an instance of the class later tasks see, and an Enum member keeps its identity
    (a dict keyed by one still finds it)."""
    classes = _of(executor).classes
    found = classes.get(key)
    if found is None:
        found = classes[key] = make(*args)
    return found


class Initialized:
    """A task that first runs its executor's ``initializer``, once per task process (``P2PExecutor(initializer=)``).

    It fails with the initializer's exception if that raises, and the next
    task tries the initializer again.
    """

    __slots__ = ("fn", "initializer", "executor")

    def __init__(self, fn: Callable[..., Any], initializer: Callable[[], Any], executor: str) -> None:
        self.fn, self.initializer, self.executor = fn, initializer, executor

    def __reduce__(self) -> tuple[Any, ...]:
        return Initialized, (self.fn, self.initializer, self.executor)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kept = _of(self.executor)
        if not kept.initialized:
            self.initializer()
            kept.initialized = True
        return self.fn(*args, **kwargs)
