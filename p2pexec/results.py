"""Unpickling results on the client without letting a worker run code here.

A pickle can name any importable callable and call it; a modified worker
could make the client run ``os.system``.  So results are unpickled with an
allow-list: data types of the standard library, exceptions, NumPy arrays
and scalars, pandas data structures, p2pexec's own outcome types, classes of
the client's own code and of the installed packages its task functions come
from.  A class the client sent by value (``__main__``, a notebook, a local
module) comes back as the client's own class, never as code built from
the worker's bytes; functions a worker sends are inert stand-ins.
Anything else fails that result with :class:`UntrustedResultError`, which
names the type and the option that allows it.  With ``trusted_results=True``
anything is unpickled, and by-value classes still come home as the client's.

Two passes.  Most results hold only the vetted types above: the C
unpickler reads them, and whatever class or function it handed out is
checked afterwards to be as it was (a pickle can ``setattr`` on any object
it holds, a class included).  A result that holds a class of the client's
code or of a task's package goes to :class:`_Careful`, the Python
unpickler with guarded opcodes: such a class is never called with the
worker's arguments (``numpy.memmap(path, "w+")`` would write a file here,
``h5py.File`` too); its instances are made with a plain ``__new__`` and
given their state, and nothing may change a class or a function.
"""

from __future__ import annotations

import builtins
import copyreg
import enum
import gc
import io
import pickle
import re
import sys
import types
import weakref
from collections.abc import Callable, Collection, Iterable
from typing import Any

import dill
import dill._dill

from .errors import P2PExecError
from .own_code import is_local_module
from .result_allowlist import ALLOWED, BUILTIN_TYPES, is_namedtuple, plain_new
from .tasks import Sealed


class UntrustedResultError(P2PExecError, TypeError):
    """A result names something the client does not unpickle from workers by default."""


class HostileResultError(UntrustedResultError):
    """A result tried to change a class or function here: no honest worker sends that (its worker is dropped)."""


class WorkerFunction:
    """Stands in for a function a worker sent: it is not run on the client."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UntrustedResultError(f"the function {self.name!r} came from a worker and is not run here; pass "
                                   f"trusted_results=True to P2PExecutor to accept code from workers")

    def __repr__(self) -> str:
        return f"<function {self.name} from a worker (not run here)>"


_METATYPE = object()  # what ``_load_type('type')`` stands for: only _create_type may take it


def _allowed_type(name: str) -> Any:
    loaded = dill._dill._load_type(name)
    if loaded is type:
        return _METATYPE
    if loaded in BUILTIN_TYPES or (isinstance(loaded, type) and issubclass(loaded, BaseException)):
        return loaded
    raise UntrustedResultError(f"a result refers to the type {name!r}; pass trusted_results=True to accept it")


def _safe_getattr(obj: Any, name: str) -> Any:
    """Only the attribute lookups that standard reconstructors pickle (``ZoneInfo._unpickle``)."""
    if isinstance(obj, type) and obj.__module__ in ("zoneinfo", "zoneinfo._zoneinfo") and name == "_unpickle":
        return getattr(obj, name)
    raise UntrustedResultError(f"a result looks up {getattr(obj, '__qualname__', type(obj).__name__)}.{name}; "
                               f"pass trusted_results=True to accept it")


# This process's own objects, which no result changes (nor looks into, for what was refused).
_SHARED = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)


def _safe_setattr(obj: Any, name: str, value: Any) -> None:
    """dill sets attributes on classes it rebuilds; ours, and any function or module here, stay as they are."""
    if not isinstance(obj, _SHARED):
        setattr(obj, name, value)


class _NeedsCare(Exception):
    """The C pass met a class it must not hand out: :class:`_Careful` reads the result instead."""


class _Rules:
    """The allow-list, for both passes: what each name a result refers to stands for."""

    _extra: Collection[str]
    _packages: Collection[str]

    def _guarded(self, found: type) -> type:
        """A class of the client's code or of a task's package: the C pass hands out none of them."""
        raise _NeedsCare()

    def _own(self, found: type) -> type:
        """Guarded, unless the user named it in ``result_types`` (their word that calling it is harmless)."""
        return found if f"{found.__module__}.{found.__qualname__}" in self._extra else self._guarded(found)

    def _refuse(self, error: UntrustedResultError) -> Any:
        """Something the allow-list refuses: the C pass lets the careful one decide (it may be part of a class
        sent by value, which is never used), which refuses it once the result is read, if it is in it."""
        raise _NeedsCare()

    def _lenient(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def called(*args: Any) -> Any:
            try:
                return call(*args)
            except UntrustedResultError as error:
                return self._refuse(error)
        return called

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._find(module, name)
        except UntrustedResultError as error:
            return self._refuse(error)

    def _find(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()) or f"{module}.{name}" in self._extra:
            return super().find_class("dill._dill" if module == "dill.dill" else module, name)  # type: ignore[misc]
        if module == "builtins":
            found = getattr(builtins, name, None)
            if isinstance(found, type) and (found in BUILTIN_TYPES or issubclass(found, BaseException)):
                return found
            if name == "setattr":
                return _safe_setattr
            if name == "getattr":
                return self._lenient(_safe_getattr)
            if isinstance(found, types.BuiltinFunctionType):  # (what a method of a class sent by value names)
                return WorkerFunction(name)
        if module == "dill._dill":
            if name == "_create_type":
                return self._lenient(lambda *args: self._own(_own_class(*args)))
            special = {"_create_function": _inert_function,
                       "_create_code": _inert_code, "_create_cell": _inert_code,
                       "_import_module": _inert_code, "_load_type": self._lenient(_allowed_type),
                       "_eval_repr": self._lenient(_range_from_repr),
                       "_create_namedtuple": dill._dill._create_namedtuple,
                       "_create_array": dill._dill._create_array}.get(name)
            if special is not None:
                return special
        if name == "__dict__" and (module in ("__main__", "builtins") or is_local_module(module)):
            return {}  # globals for stand-in functions; the real ones stay out of reach
        own = _own_object(module, name)
        if own is None and module.split(".")[0] in self._packages:
            own = _class_in(module, name)  # a class a package the client's tasks come from defines itself
        if own is not None:
            return self._own(own)
        if module.startswith("dill."):  # how dill rebuilds a lock, a file, a frame...: a resource, not data
            raise UntrustedResultError(
                f"a result holds something dill rebuilds with {module}.{name} (a lock, an open file, a thread, "
                f"a module...): a resource of the worker's, which means nothing here; return its data instead "
                f"(a file's contents, say)")
        raise UntrustedResultError(
            f"a result refers to {module}.{name}, which the client does not unpickle from workers by default; "
            f"pass result_types=[{f'{module}.{name}'!r}] (or trusted_results=True) to P2PExecutor to accept it")


class _Loader(_Rules, pickle.Unpickler):
    """The C pass: the C unpickler with the allow-list; each class and function it hands out must be as it was
    once the result is read.

    Not dill's Unpickler: the names dill's pickles use are mapped here
    (its ``find_class`` adds only ``dill.dill`` and ``__builtin__`` aliases,
    which the allow-list never reached), and it costs a third of a small
    result's unpickling.
    """

    def __init__(self, file: Any, buffers: list[Any], extra: Collection[str], packages: Collection[str]) -> None:
        super().__init__(file, buffers=buffers)
        self._extra = extra
        self._packages = packages
        self._handed: dict[int, tuple[Any, tuple[Any, ...]]] = {}  # id -> (class or function, how it was)

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if id(found) not in self._handed and _changeable(found):
            self._handed[id(found)] = (found, _state_of(found))
        return found

    def load(self) -> Any:
        try:
            return super().load()
        except BaseException:  # its stack may hold closures of ours, which hold it: out of the cyclic GC's sight
            pickle.Unpickler.__init__(self, io.BytesIO(b""))  # (a new start empties it)
            raise
        finally:
            handed, self._handed = self._handed, {}
            self.memo.clear()  # (with ``handed``, it holds the closures of _lenient: cycles back to this loader)
            for found, was in handed.values():
                if _state_of(found) != was:
                    _restore(found, was)
                    raise HostileResultError(f"a result changed {getattr(found, '__qualname__', found)!r} here, "
                                               f"which a result may not do; the worker that sent it is broken or "
                                               f"hostile")


_PyUnpickler: Any = pickle._Unpickler  # (the Python one: its opcodes can be guarded)


class _Careful(_Rules, _PyUnpickler):
    """The careful pass, for a result that holds a class of the client's code or of a task's package: the
    Python unpickler, where such a class is never called with the worker's arguments and no class or
    function may be changed."""

    dispatch = dict(_PyUnpickler.dispatch)

    def __init__(self, file: Any, buffers: list[Any], extra: Collection[str], packages: Collection[str]) -> None:
        super().__init__(file, buffers=buffers)
        self._extra = extra
        self._packages = packages
        self._classes: set[type] = set()  # the guarded classes handed out
        self._made: list[weakref.ref[_Refused]] = []  # stand-ins for what the allow-list refused

    def _guarded(self, found: type) -> type:
        self._classes.add(found)
        return found

    def _refuse(self, error: UntrustedResultError) -> Any:
        refused = _Refused(error)
        self._made.append(weakref.ref(refused))
        return refused

    def load(self) -> Any:
        """The result, unless a stand-in for something refused is in it, or still alive anywhere once the
        pickle's memo is let go (an object array's items, say, which the search cannot see)."""
        try:
            result = super().load()
        finally:
            self.memo.clear()  # (it holds the closures of _lenient: cycles back to this loader)
        refused = _first_refused(result)
        if refused is None and any(made() is not None for made in self._made):
            gc.collect()  # (a cycle among what a class sent by value brought: garbage, not the result)
            refused = next((r for r in (made() for made in self._made) if r is not None), None)
        if refused is not None:
            raise refused.error
        return result

    def _check_call(self, func: Any, args: tuple[Any, ...]) -> None:
        """May ``func(*args)`` run?  A guarded class only where calling it builds a value and nothing else;
        copyreg's constructors only with a plain ``__new__``."""
        if func in self._classes:
            if issubclass(func, BaseException) or isinstance(func, enum.EnumMeta) and len(args) == 1 \
                    or is_namedtuple(func):
                return
            raise UntrustedResultError(
                f"a result rebuilds {func.__module__}.{func.__qualname__} by calling it with arguments the worker "
                f"chose, which could act here (open or write a file); pass "
                f"result_types=[{f'{func.__module__}.{func.__qualname__}'!r}] to P2PExecutor if calling it is "
                f"harmless (or trusted_results=True)")
        if func in (copyreg.__newobj__, copyreg.__newobj_ex__) and args:  # type: ignore[attr-defined]
            self._check_new(args[0])
        elif func is copyreg._reconstructor and len(args) == 3:  # type: ignore[attr-defined]
            self._check_new(args[0])
            if args[1] in self._classes:
                raise UntrustedResultError(f"a result rebuilds an object with {args[1].__qualname__}'s own "
                                           f"constructor; pass trusted_results=True to accept it")

    def _check_new(self, cls: Any) -> None:
        if cls in self._classes and not plain_new(cls):
            raise UntrustedResultError(
                f"a result makes a {cls.__module__}.{cls.__qualname__}, whose __new__ runs its own code with "
                f"arguments the worker chose; pass result_types=[{f'{cls.__module__}.{cls.__qualname__}'!r}] to "
                f"P2PExecutor if that is harmless (or trusted_results=True)")

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        refused = next((a for a in (stack[-1], *args) if type(a) is _Refused), None)  # stands for what it makes
        if refused is None:
            try:
                self._check_call(stack[-1], args)
            except UntrustedResultError as error:
                refused = self._refuse(error)  # (refused if the result holds it: see load)
        stack[-1] = refused if refused is not None else stack[-1](*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self._new(args, {})

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self._new(args, kwargs)

    def _new(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cls = self.stack[-1]
        if type(cls) is _Refused:
            return
        try:
            self._check_new(cls)
        except UntrustedResultError as error:
            self.stack[-1] = self._refuse(error)
            return
        self.stack[-1] = cls.__new__(cls, *args, **kwargs)

    def _instantiate(self, klass: Any, args: tuple[Any, ...]) -> None:  # INST and OBJ (protocols 0 and 1)
        self._check_call(klass, args) if args or hasattr(klass, "__getinitargs__") else self._check_new(klass)
        super()._instantiate(klass, args)

    def load_build(self) -> None:
        if type(self.stack[-2]) is _Refused:
            self.stack.pop()
            return
        if isinstance(self.stack[-2], _SHARED):
            raise HostileResultError(f"a result changes {getattr(self.stack[-2], '__qualname__', '?')!r} here, "
                                       f"which a result may not do; the worker that sent it is broken or hostile")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


class _Refused:
    """What the careful pass makes of something the allow-list refuses: a stand-in that takes whatever the
    pickle does to it.  If it is anywhere in the result, the result fails with ``error``; inside a class sent
    by value (which comes home as the client's own class) it is dropped with the class's namespace."""

    def __init__(self, error: UntrustedResultError) -> None:
        error.__context__ = None
        self.error = error.with_traceback(None)  # (its frames would keep this alive, in a cycle)

    def __call__(self, *args: Any, **kwargs: Any) -> _Refused:
        return self

    def append(self, item: Any) -> None:
        pass

    extend = add = update = append

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _first_refused(result: Any) -> _Refused | None:
    """A :class:`_Refused` the result holds, if any (classes, modules and functions are not looked into)."""
    seen: set[int] = set()
    todo = [result]
    while todo:
        obj = todo.pop()
        if type(obj) is _Refused:
            return obj
        if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return None


_OPAQUE = (*_SHARED, types.CodeType, WorkerFunction)  # (not looked into for what was refused)


def _range_from_repr(text: str) -> range:
    """dill pickles a ``range`` as its repr, to be evaluated: nothing is, but a range's is read."""
    numbers = re.fullmatch(r"range\((-?\d+), (-?\d+)(?:, (-?\d+))?\)", text) if isinstance(text, str) else None
    if numbers is None:
        raise UntrustedResultError(f"a result asks to evaluate {str(text)[:80]!r}; pass trusted_results=True to "
                                   f"accept it")
    return range(*(int(n) for n in numbers.groups() if n is not None))


def _changeable(obj: Any) -> bool:
    """A class or function whose attributes a pickle could set (not a builtin or other immutable type, nor
    a :class:`~p2pexec.tasks.Sealed` one)."""
    if isinstance(obj, type):
        return not obj.__flags__ & _IMMUTABLE_TYPE and not isinstance(obj, Sealed)
    return isinstance(obj, types.FunctionType)


_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: builtin and most extension types
_ABSENT = object()


def _state_of(obj: Any) -> tuple[Any, ...]:
    """What a pickle could change of a class or function (its attributes, a function's defaults); two states
    compare equal while they hold the very same objects (tuples compare by identity first)."""
    attrs = vars(obj)
    return tuple(attrs), tuple(attrs.values()), getattr(obj, "__defaults__", None), \
        getattr(obj, "__kwdefaults__", None)


def _restore(obj: Any, was: tuple[Any, ...]) -> None:
    names, values, defaults, kwdefaults = was
    attrs = dict(zip(names, values))
    for name in set(vars(obj)) - set(attrs):
        delattr(obj, name)
    for name, value in attrs.items():
        if vars(obj).get(name, _ABSENT) is not value:
            setattr(obj, name, value)
    if isinstance(obj, types.FunctionType):
        obj.__defaults__, obj.__kwdefaults__ = defaults, kwdefaults


def _own_object(module: str, qualname: str) -> type | None:
    """A class of the client's own code (``__main__`` or a module of the user's): not installed code."""
    return _class_in(module, qualname) if module == "__main__" or is_local_module(module) else None


def _class_in(module: str, qualname: str) -> type | None:
    """The class that ``module`` itself defines as ``qualname``, as already imported here; else None.

    Only a class whose own ``__module__`` and ``__qualname__`` say so: ``__main__.subprocess.Popen``
    (reached through an import in ``__main__``) is not a class of ``__main__``.  No module is
    imported because a worker named it.
    """
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type) or found.__module__ != module or found.__qualname__ != qualname:
        return None
    return found


def _own_class_of(name: str, namespace: dict[str, Any]) -> type | None:
    """The client's own class that a class sent by value (built by dill's ``_create_type``) stands for."""
    module, qualname = namespace.get("__module__"), namespace.get("__qualname__", name)
    return _own_object(module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None


def _own_class(metatype: Any, name: str, bases: Any, namespace: dict[str, Any]) -> type:
    """A class sent by value comes home as the client's own class of that name."""
    own = _own_class_of(name, namespace)
    if own is None:
        module, qualname = namespace.get("__module__"), namespace.get("__qualname__", name)
        raise UntrustedResultError(f"a result holds an instance of {module}.{qualname}, a class this client does "
                                   f"not have; pass trusted_results=True to accept classes built by workers")
    return own


def _inert_function(code: Any, globals_: Any, name: Any = "?", *args: Any, **kwargs: Any) -> WorkerFunction:
    return WorkerFunction(str(name))


def _inert_code(*args: Any) -> None:
    return None


def load(main: Any, buffers: Iterable[Any], extra: Collection[str] = (), packages: Collection[str] = ()) -> Any:
    """Unpickle a result payload with the allow-list, plus ``extra`` "module.name" entries and the classes of
    ``packages`` (those the client's task functions come from)."""
    buffers = list(buffers)  # (read twice when the careful pass takes over)
    file = io.BytesIO(main)
    try:
        try:
            return _Loader(file, buffers, extra, packages).load()
        except _NeedsCare:
            pass  # (out of the except block: the careful pass's errors are not "during handling of" this)
        file.seek(0)
        return _Careful(file, buffers, extra, packages).load()
    finally:  # whatever keeps a loader (a cycle through its closures), it must not keep the message
        buffers.clear()  # (of which these are views)
        file.close()


class _TrustedLoader(dill.Unpickler):
    """dill's unpickler, for ``trusted_results=True``: anything goes, but a class sent by value still comes
    home as the client's own class when the client has one, so ``except MyError`` catches as it does
    under the allow-list (dill alone would build a second class of that name)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("dill._dill", "dill.dill") and name == "_create_type":
            return _own_class_or_new
        return super().find_class(module, name)


def _own_class_or_new(metatype: Any, name: str, bases: Any, namespace: dict[str, Any]) -> type:
    own = _own_class_of(name, namespace)
    return own if own is not None else dill._dill._create_type(metatype, name, bases, namespace)


def load_trusted(main: Any, buffers: Iterable[Any]) -> Any:
    """Unpickle a result payload from a trusted worker (it may run code here)."""
    return _TrustedLoader(io.BytesIO(main), buffers=buffers).load()
