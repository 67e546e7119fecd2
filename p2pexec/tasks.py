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
    """

    __slots__ = ("data", "digest")

    def __init__(self, fn: Callable[..., Any]) -> None:
        buf = io.BytesIO()
        _TaskPickler(buf, protocol=_PROTOCOL, recurse=True).dump(fn)  # in-band: it is sent with every task
        self.data = buf.getvalue()
        self.digest = hashlib.blake2b(self.data, digest_size=16).digest()

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_function, (self.data, self.digest)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a prepickled function runs on workers only")


_functions: dict[bytes, Callable[..., Any]] = {}


def _load_function(data: bytes, digest: bytes) -> Callable[..., Any]:
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
    if ok and is_plain(value):
        return _dumps_plain(outcome)
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
    main, *buffers = unpack_parts(payload)
    if trusted:
        outcome = dill.loads(main, buffers=buffers)
    else:
        from .results import load

        outcome = load(main, buffers, result_types, packages)
    if not isinstance(outcome, Outcome):
        raise TypeError(f"a worker returned {type(outcome).__name__}, not a task outcome")
    return outcome


class _ExceptionWithTraceback:
    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exception, (self.exc, self.tb)
