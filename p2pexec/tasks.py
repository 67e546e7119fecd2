"""What travels between a client and a task process: dill payloads and results.

The worker daemon forwards these bytes without ever unpickling them; only
the task process (on the worker) and the client do.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import sys
import sysconfig
import threading
import traceback
import types
import weakref
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import dill
import dill._dill

from .errors import RemoteTraceback
from .protocol import values as wire
from .protocol.frames import Buffer, nbytes, pack_parts, unpack_parts

_PROTOCOL = 5


@functools.lru_cache(maxsize=1024)
def is_local_module(name: str | None) -> bool:
    """True for a module a worker cannot be expected to have: the user's own code.

    Installed code (stdlib, site-packages, p2pexec itself) is pickled by
    reference, as usual; a script's helper module, a test module or a
    notebook's code is pickled by value, like ``__main__``.
    """
    module = sys.modules.get(name or "")
    path = getattr(module, "__file__", None)
    if not path or (name or "").split(".")[0] == "p2pexec":
        return False
    installed = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    installed.update(p for p in sys.path if "site-packages" in p or "dist-packages" in p)
    resolved = Path(path).resolve()
    return not any(resolved.is_relative_to(Path(p).resolve()) for p in installed if p)


_dill_locate = dill._dill._locate_function


def _locate(obj: Any, pickler: Any = None) -> bool:
    # dill pickles a function or class by value when it cannot "locate" it;
    # our task pickler also declines to locate the user's local code.
    if isinstance(pickler, _TaskPickler) and is_local_module(getattr(obj, "__module__", None)):
        return False
    return _dill_locate(obj, pickler)


dill._dill._locate_function = _locate


OUT_OF_BAND = 64 * 1024


def _large_bytes_out_of_band(obj: Any) -> Any:
    # Big buffers travel as views beside the pickle (protocol 5), never copied
    # into it; NumPy arrays and PickleBuffers do this by themselves.
    kind = type(obj)
    if kind in (bytes, bytearray, memoryview) and memoryview(obj).nbytes >= OUT_OF_BAND:
        if kind is not memoryview or obj.c_contiguous:
            return kind, (pickle.PickleBuffer(obj),)
    return NotImplemented


class _TaskPickler(dill.Pickler):
    reducer_override = staticmethod(_large_bytes_out_of_band)


def _dumps(obj: Any, **options: Any) -> list[Buffer]:
    """``obj`` as a payload: the pickle, then its out-of-band buffers."""
    buf = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    _TaskPickler(buf, protocol=_PROTOCOL, buffer_callback=buffers.append, **options).dump(obj)
    return pack_parts([buf.getbuffer(), *(b.raw() for b in buffers)])


def _dumps_plain(obj: Any) -> list[Buffer]:
    """The C pickler, for data :func:`is_plain` accepted: nothing in it goes out of band."""
    return pack_parts([pickle.dumps(obj, protocol=_PROTOCOL)])


def _loads(payload: Buffer, values: Sequence[Buffer] = ()) -> Any:
    main, *buffers = unpack_parts(payload)
    if not values:
        return dill.loads(main, buffers=buffers)
    return _ValueUnpickler(io.BytesIO(main), values, buffers=buffers).load()


class _ValueUnpickler(dill.Unpickler):
    """Loads a task whose big values came beside it (:class:`Value`): each one fresh, once per task."""

    def __init__(self, file: io.BytesIO, values: Sequence[Buffer], **options: Any) -> None:
        super().__init__(file, **options)
        self._values = values
        self._loaded: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not int or not 0 <= pid < len(self._values):
            raise pickle.UnpicklingError(f"a task refers to value {pid!r}, which did not come with it")
        if pid not in self._loaded:  # the same value twice in a task is one object, as it was on the client
            self._loaded[pid] = _loads(self._values[pid])
        return self._loaded[pid]


class PrepickledFunction:
    """A function pickled once and sent with many tasks (one ``map`` call).

    Pickling a function by value costs far more than a small task's
    arguments, so ``map`` does it once; task processes unpickle each
    distinct function once too, keyed by the digest of its bytes.
    With ``fresh``, each task unpickles its own copy instead, as if the
    function had been pickled with it (what ``submit`` does: a task that
    rebinds a global of its function does not leave it changed for the next).
    """

    __slots__ = ("data", "digest", "fresh")

    def __init__(self, fn: Callable[..., Any], fresh: bool = False) -> None:
        buf = io.BytesIO()
        _TaskPickler(buf, protocol=_PROTOCOL, recurse=True).dump(fn)  # in-band: it is sent with every task
        self.data = buf.getvalue()
        self.digest = hashlib.blake2b(self.data, digest_size=16).digest()
        self.fresh = fresh

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_function, (self.data, self.digest, True) if self.fresh else (self.data, self.digest)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a prepickled function runs on workers only")


_functions: dict[bytes, Callable[..., Any]] = {}


def _load_function(data: bytes, digest: bytes, fresh: bool = False) -> Callable[..., Any]:
    if fresh:
        return dill.loads(data)
    fn = _functions.get(digest)
    if fn is None:
        if hashlib.blake2b(data, digest_size=16).digest() != digest:
            raise ValueError("prepickled function does not match its digest")
        if len(_functions) >= 64:
            _functions.pop(next(iter(_functions)))
        fn = _functions[digest] = dill.loads(data)
    return fn


_ATOMS = frozenset({int, float, complex, str, bytes, bool, type(None)})
_CONTAINERS = frozenset({tuple, list, dict, set, frozenset})


def is_plain(obj: Any, budget: int = 1 << 16) -> bool:
    """Builtin data only (exact types): the C pickler treats it exactly as dill would, 10-50x faster.

    The check costs a fraction of a microsecond per element, dill several;
    ``budget`` bounds it for big data, which then takes dill's path.

    Large ``bytes`` are not plain: the C pickler never offers exact bytes to
    ``reducer_override``, so they would go in-band instead of out of band.
    """
    stack = [obj]
    while stack:
        budget -= 1
        if budget < 0:
            return False
        item = stack.pop()
        kind = type(item)
        if kind in _ATOMS:
            if kind is bytes and len(item) >= OUT_OF_BAND:
                return False
            continue
        if kind not in _CONTAINERS:
            return False
        stack.extend(item.items() if kind is dict else item)
    return True


class _NotPlain(Exception):
    pass


class _PlainPickler(pickle.Pickler):
    """The C pickler, refusing all but builtin data and one :class:`PrepickledFunction`: whether data is
    plain is found out while pickling it, at C speed.

    The C pickler asks ``reducer_override`` about every object except None,
    bools and exact ints, floats, bytes, str, dicts, sets, frozensets,
    lists, tuples, bytearrays and PickleBuffers; a PickleBuffer (which
    :func:`_dumps` would send out of band) is refused by the buffer
    callback.  Big bytes are not refused here: callers check the size.
    """

    allowed: Any = None

    def reducer_override(self, obj: Any) -> Any:
        if obj is self.allowed or obj is _load_function or obj is Outcome or type(obj) is Outcome:
            return NotImplemented  # its own reduction, or its name
        raise _NotPlain


def _refuse_buffer(_: Any) -> bool:
    raise _NotPlain


def _big_bytes(*objs: Any) -> bool:
    """One of ``objs`` is bytes that must go out of band: pickling it in-band first, to find that out, would copy it."""
    return any(type(o) is bytes and len(o) >= OUT_OF_BAND for o in objs)


def _plain_pickle(obj: Any, allowed: Any = None) -> bytes | None:
    """``obj`` pickled by the C pickler if it is builtin data only (apart from ``allowed``), else None."""
    buf = io.BytesIO()
    pickler = _PlainPickler(buf, protocol=_PROTOCOL, buffer_callback=_refuse_buffer)
    pickler.allowed = allowed
    try:
        pickler.dump(obj)
    except (_NotPlain, RecursionError, pickle.PicklingError):
        return None
    return buf.getvalue()


def prepare_task(fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[list[Buffer], tuple[Value, ...], bool]:
    """A task's payload and big values (:func:`dump_task_values`), and whether its arguments are plain data.

    The common cases cost a few microseconds: a ``map`` chunk or a function
    pickled by value (:func:`prepickled`, unchanged since it was last
    pickled), with builtin data as arguments, go through the C pickler
    once; everything else takes :func:`dump_task_values`' way.
    """
    carried: Any = None
    if type(fn) is PrepickledFunction:
        carried = fn if len(fn.data) < OUT_OF_BAND else None
    elif type(fn) is types.BuiltinFunctionType:
        carried = fn if _stable(fn, [], set()) else None  # len, math.sqrt: by name
    elif type(fn) is types.FunctionType:
        carried = prepickled(fn)
        if carried is None and _by_reference(fn):
            carried = fn  # the C pickler names it as dill would
        elif carried is not None and len(carried.data) >= OUT_OF_BAND:
            carried = None
    if carried is not None and not _big_bytes(*args, *kwargs.values()):
        main = _plain_pickle((carried, args, kwargs), carried)
        if main is not None and len(main) < wire.HOIST_MIN and (len(main) < OUT_OF_BAND or is_plain((args, kwargs))):
            return pack_parts([main]), (), True  # (big bytes must go out of band: is_plain refuses them)
    plain = is_plain((args, kwargs))
    payload, values = dump_task_values(fn, args, kwargs, plain)
    return payload, values, plain


# -- functions pickled by value, once while they stay the same ------------------------------------------------
_ABSENT = object()
_by_value: "weakref.WeakKeyDictionary[Callable[..., Any], tuple[tuple[Any, ...], PrepickledFunction]]" = \
    weakref.WeakKeyDictionary()
_by_value_lock = threading.Lock()


def prepickled(fn: types.FunctionType) -> PrepickledFunction | None:
    """``fn`` pickled by value (as :func:`dump_task` would), reused while nothing it was pickled from changed.

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
    with _by_value_lock:
        hit = _by_value.get(fn)
    if hit is not None and _unchanged(hit[0]):
        return hit[1]
    if _by_reference(fn):
        return None
    snapshot: list[tuple[Any, ...]] = []
    if not _snapshot(fn, snapshot, set()):
        return None
    try:
        made = PrepickledFunction(fn, fresh=True)
    except Exception:
        return None  # dump_task reports it
    with _by_value_lock:
        _by_value[fn] = (tuple(snapshot), made)
    return made


def _by_reference(obj: Any) -> bool:
    """Does a task pickle ``obj`` (a function or class) by reference, i.e. by its module and name?"""
    try:
        return not is_local_module(getattr(obj, "__module__", None)) and bool(_dill_locate(obj, None))
    except Exception:
        return False


_STABLE_TYPES = frozenset({int, float, complex, str, bool, type(None)})


def _stable(obj: Any, snapshot: list[tuple[Any, ...]], seen: set[int]) -> bool:
    """Is ``obj`` pickled the same while it is the same object?  A function pickled by value is, if
    everything it is pickled from is (its checks go into ``snapshot``)."""
    kind = type(obj)
    if kind in _STABLE_TYPES:
        return True
    if kind is bytes:
        return len(obj) < OUT_OF_BAND
    if kind is tuple:
        return all(_stable(item, snapshot, seen) for item in obj)
    if kind is types.ModuleType:
        return obj.__name__ != "__main__"  # (any other module is pickled by name)
    if kind is types.BuiltinFunctionType:  # len, math.sqrt: by name; not a method of some object ([].append)
        return getattr(obj, "__self__", None) is None or type(obj.__self__) is types.ModuleType
    if kind is types.FunctionType:
        return _by_reference(obj) or _snapshot(obj, snapshot, seen)
    if isinstance(obj, type):
        return _by_reference(obj)
    return False


def _code_names(code: types.CodeType) -> set[str]:
    """Every name the code and the code nested in it may look up (a superset of its globals)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if type(const) is types.CodeType:
            names |= _code_names(const)
    return names


def _snapshot(fn: types.FunctionType, snapshot: list[tuple[Any, ...]], seen: set[int]) -> bool:
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
    snapshot.append((fn, fn.__code__, fn.__defaults__, kwdefaults, tuple((kwdefaults or {}).items()), notes,
                     tuple(notes.items()), fn.__closure__, tuple(cells), fn.__name__, fn.__qualname__,
                     fn.__module__, fn.__doc__, tuple(names)))
    return True


def _unchanged(snapshot: tuple[tuple[Any, ...], ...]) -> bool:
    """Is every object the snapshot's functions were pickled from still the same one?"""
    for (fn, code, defaults, kwdefaults, kwitems, notes, noteitems, closure, cells, name, qualname, module,
         doc, names) in snapshot:
        if (fn.__code__ is not code or fn.__defaults__ is not defaults or fn.__kwdefaults__ is not kwdefaults
                or fn.__annotations__ is not notes or fn.__closure__ is not closure or fn.__dict__
                or fn.__name__ is not name or fn.__qualname__ is not qualname or fn.__module__ is not module
                or fn.__doc__ is not doc):
            return False
        if kwitems and (len(kwdefaults) != len(kwitems) or any(kwdefaults.get(k, _ABSENT) is not v for k, v in kwitems)):
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
            if globs.get(key, _ABSENT) is not value or (value is _ABSENT and builtins_.get(key, _ABSENT) is not builtin):
                return False
    return True


def dump_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              plain: bool | None = None) -> list[Buffer]:
    """The task's payload; ``plain`` is :func:`is_plain` of ``(args, kwargs)`` when the caller knows it already."""
    if isinstance(fn, PrepickledFunction) and (is_plain((args, kwargs)) if plain is None else plain):
        return _dumps_plain((fn, args, kwargs))  # the common map case: the C pickler, 20x faster
    # recurse=True pickles only the globals a function uses, so functions
    # from a user's __main__ travel without dragging the whole module along.
    return _dumps((fn, args, kwargs), recurse=True)


def load_task(payload: Buffer, values: Sequence[Buffer] = ()) -> tuple[Callable[..., Any], tuple[Any, ...],
                                                                       dict[str, Any]]:
    """A task, in the task process; ``values`` are the payloads of the big values it refers to, in order."""
    return _loads(payload, values)


# -- big values: pickled on their own, sent to each worker once ----------------------------------------------
@dataclass(eq=False)
class Value:
    """A big argument (or function) pickled on its own, named by its digest (:mod:`p2pexec.protocol.values`)."""

    parts: list[Buffer]  # its payload, as :func:`_dumps` makes it
    digest: bytes = b""
    size: int = 0
    modules: frozenset[str] | None = None  # the modules its pickle names, once the client asked

    def __post_init__(self) -> None:
        self.digest = wire.digest(self.parts)
        self.size = sum(nbytes(p) for p in self.parts)

    @property
    def pickle(self) -> Buffer:
        return self.parts[1]  # [header, pickle, out-of-band buffers...]


_numpy_array: Any = None  # numpy.ndarray, once numpy is loaded


def _hoistable_size(obj: Any) -> int:
    """How big ``obj`` is, for the types whose size costs nothing to know; 0 for the rest."""
    global _numpy_array
    kind = type(obj)
    if kind is bytes or kind is bytearray or kind is str:
        return len(obj)
    if kind is memoryview:
        return obj.nbytes if obj.c_contiguous else 0
    if kind is PrepickledFunction:
        return len(obj.data)
    if _numpy_array is None:
        numpy = sys.modules.get("numpy")  # (never imported here: an array's module is loaded already)
        if numpy is None:
            return 0
        _numpy_array = numpy.ndarray
    return obj.nbytes if isinstance(obj, _numpy_array) else 0


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

    def dump(self, obj: Any) -> list[Buffer]:
        self.used, self.values = {}, []
        buf = io.BytesIO()
        buffers: list[pickle.PickleBuffer] = []
        pickler = _HoistingPickler(buf, protocol=_PROTOCOL, buffer_callback=buffers.append, recurse=True)
        pickler.hoisting, pickler.memo_of_values = self, self.memo
        pickler.dump(obj)
        return pack_parts([buf.getbuffer(), *(b.raw() for b in buffers)])


_NEVER_BIG_ALONE = frozenset({int, float, bool, complex, type(None), tuple, list, dict, set, frozenset, type,
                              types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.CellType,
                              types.ModuleType, functools.partial})


class _HoistingPickler(_TaskPickler):
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
        value = Value(_dumps(obj, recurse=True))
        self.memo_of_values[id(obj)] = (obj, value)
        return self.hoisting.index(value)


_shared = threading.local()


@contextmanager
def shared_values() -> Iterator[None]:
    """Within this block (one ``map`` call) the same big object, met again, is the same value: pickled once.

    Nothing else runs in this thread meanwhile, so what it holds cannot change in between.
    """
    outer = getattr(_shared, "memo", None)
    _shared.memo = {}
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
        elif kind not in _ATOMS or _hoistable_size(item):
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
    if plain and (not isinstance(fn, PrepickledFunction) or len(fn.data) < wire.HOIST_MIN):
        payload = dump_task(fn, args, kwargs, plain)
        if nbytes(payload[1]) < wire.HOIST_MIN:
            return payload, ()
    memo = getattr(_shared, "memo", None)
    hoisting = _Hoisting({} if memo is None else memo)
    task = (fn, args, kwargs)
    payload = hoisting.dump(task)
    if nbytes(payload[1]) >= wire.HOIST_MIN:  # big in its own pickle: which parts make it so?
        probe = _Hoisting(hoisting.memo)
        for part in _components(task):
            if id(part) not in hoisting.memo and nbytes(probe.dump(part)[1]) >= wire.HOIST_MIN:
                hoisting.memo[id(part)] = (part, Value(_dumps(part, recurse=True)))
        payload = hoisting.dump(task)
    return payload, tuple(hoisting.values)


def _rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class RemoteError(Exception):
    """Stands in for a task exception that could not be pickled."""


@dataclass
class Outcome:
    """A task's result or exception, plus what it printed."""

    ok: bool
    value: Any
    stdout: str = ""
    stderr: str = ""


def dump_outcome(ok: bool, value: Any, stdout: str, stderr: str) -> list[Buffer]:
    """Pickle a task's outcome; an exception keeps its formatted traceback."""
    if not ok:
        tb = "".join(traceback.format_exception(type(value), value, value.__traceback__))
        tb = f'\n"""\n{tb}"""'
        try:  # the client must be able to rebuild it, not merely we to pickle it
            dill.loads(dill.dumps(value, protocol=_PROTOCOL))
        except Exception:
            value = RemoteError(f"{type(value).__qualname__}: {value}")
        value = _ExceptionWithTraceback(value, tb)
    outcome = Outcome(ok, value, stdout, stderr)
    if ok and not _big_bytes(value):
        main = _plain_pickle(outcome)  # builtin data: the C pickler, and nothing else to check
        if main is not None and (len(main) < OUT_OF_BAND or is_plain(value)):  # (big bytes go out of band)
            return pack_parts([main])
    try:
        return _dumps(outcome)
    except Exception as exc:
        if not ok:
            raise
        error = TypeError(f"the task's return value could not be pickled: {exc!r}")
        return dump_outcome(False, error, stdout, stderr)


def load_outcome(payload: Buffer, trusted: bool = True, result_types: Collection[str] = (),
                 packages: Collection[str] = ()) -> Outcome:
    """A task's outcome; unless ``trusted``, unpickled with :mod:`p2pexec.results`' allow-list."""
    from .results import load, load_trusted  # (it imports this module)

    main, *buffers = unpack_parts(payload)
    outcome = load_trusted(main, buffers) if trusted else load(main, buffers, result_types, packages)
    if not isinstance(outcome, Outcome):
        raise TypeError(f"a worker returned {type(outcome).__name__}, not a task outcome")
    return outcome


class _ExceptionWithTraceback:
    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exception, (self.exc, self.tb)
