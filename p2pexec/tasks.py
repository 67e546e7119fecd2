"""What travels between a client and a task process: dill payloads and results.

The worker daemon forwards these bytes without ever unpickling them; only
the task process (on the worker) and the client do.  This module is the
format both ends share: the task pickler (the user's local code by value,
big buffers out of band), :func:`dump_task` and :func:`load_task`, the C
pickler's fast path for plain data, :class:`PrepickledFunction` and the
task's :class:`Outcome`.  What pickles name (``_load_function``, ``_array``,
``_bytes``, ``_bytearray``, ``Outcome``, ``RemoteError``,
``_rebuild_exception``) lives here and stays here: clients and workers of other versions refer to it as
``p2pexec.tasks`` (the names of :mod:`p2pexec.task_dispatch`,
:mod:`p2pexec.enum_classes` and :mod:`p2pexec.namespaces` stay there).  The client's way to a payload is in
:mod:`p2pexec.prepare` (functions pickled once) and
:mod:`p2pexec.hoisting` (big values sent once).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import traceback
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import dill
import dill._dill

from . import enum_classes, namespaces
from .copies import copied
from .errors import RemoteTraceback
from .protocol.frames import OP_HEADER_BYTES, Buffer, nbytes, pack_parts, unpack_parts
from .task_dispatch import DISPATCH, FLAT_ITEMS

PROTOCOL = 5
OUT_OF_BAND = 64 * 1024


_ndarray: Any = None  # numpy.ndarray, once numpy is loaded


def numpy_array_type() -> Any:
    """``numpy.ndarray`` if numpy is loaded, else None (never imported here: an array's module is loaded)."""
    global _ndarray
    if _ndarray is None and "numpy" in sys.modules:
        _ndarray = sys.modules["numpy"].ndarray
    return _ndarray


def _large_bytes_out_of_band(obj: Any) -> Any:
    # Big buffers travel as views beside the pickle (protocol 5), never copied
    # into it.  dill would pickle an array through tobytes(), copied on each
    # side; _array loads it where its buffer lies.
    kind = type(obj)
    if kind in _REBUILT:
        if memoryview(obj).nbytes >= OUT_OF_BAND and (kind is not memoryview or obj.c_contiguous):
            return _REBUILT[kind], (pickle.PickleBuffer(obj),)
    elif kind is numpy_array_type() and obj.nbytes >= OUT_OF_BAND and not obj.dtype.hasobject:
        flags = obj.flags
        if flags.c_contiguous or flags.f_contiguous:  # (else dill's way: a copy, contiguous)
            order = "C" if flags.c_contiguous else "F"
            raw = obj.ravel(order="K").view("u1")  # (bytes: a datetime64 array exports no buffer of its own)
            return _array, (pickle.PickleBuffer(raw), obj.dtype, obj.shape, order)
    return NotImplemented


def _bytes(buffer: Any) -> bytes:
    """A big ``bytes`` from its out-of-band buffer (:mod:`p2pexec.copies`; in band, the pickle made it already)."""
    return buffer if type(buffer) is bytes else copied(buffer, bytes)


def _bytearray(buffer: Any) -> bytearray:
    return buffer if type(buffer) is bytearray else copied(buffer, bytearray)


_REBUILT: dict[type, Callable[[Any], Any]] = {bytes: _bytes, bytearray: _bytearray, memoryview: memoryview}


def _array(buffer: Any, dtype: Any, shape: tuple[int, ...], order: str) -> Any:
    """An array made on its out-of-band buffer, in place: a task process maps a value privately, so a
    task reads it without a copy and writes into its own.  Copied where that memory is read-only (a
    small message's bytes, or the array was: it comes back writable, as from ProcessPoolExecutor) or
    misaligned: numpy takes other loops there, whose sums differ from the client's in the last bits."""
    import numpy

    array = numpy.frombuffer(buffer, dtype)
    if not (array.flags.aligned and array.flags.writeable):
        array = array.copy()
    return array.reshape(shape, order="F" if order == "F" else "C")


class TaskPickler(dill.Pickler):
    """dill's pickler, with the user's own code by value (:mod:`p2pexec.own_code`), big buffers out of band,
    and what :mod:`p2pexec.task_dispatch` adds."""

    reducer_override = staticmethod(_large_bytes_out_of_band)
    dispatch = DISPATCH
    sends_own_code = True  # (dill's _locate_function, patched by own_code)
    in_code = 0  # how deep in code sent by value (a function, a class, a module) the pickle is
    flat_in_c = True  # long flat lists, tuples and dicts go in one piece by the C pickler (task_dispatch)
    globals_of: dict[int, str] = {}  # id of a function's new globals dict -> the executor whose namespace it is

    def save_reduce(self, func: Any, args: Any, *rest: Any, **options: Any) -> None:
        if func is dill._dill._create_function and type(args[1]) is dict and len(args[1]) == 1:
            executor = namespaces.current()  # (dill made this dict for the function: {"__name__": its module})
            if executor is not None:
                if not self.globals_of:
                    self.globals_of = {}
                self.globals_of[id(args[1])] = executor  # (alive till the pickle is done: memoized)
        elif func is dill._dill._create_type or func is enum_classes.make_enum:
            executor = namespaces.current()  # a class by value: one class in a task process, however often sent
            if executor is not None:
                func, args = namespaces._same_class, (executor, namespaces.class_key(options["obj"]), func, *args)
        super().save_reduce(func, args, *rest, **options)


def dump_payload(obj: Any, landing: int | None = None, frozen: bool = True, flat_in_c: bool = True,
                 **options: Any) -> list[Buffer]:
    """``obj`` as a payload: the pickle, then its out-of-band buffers.

    With ``landing``, the payload will land at that offset from an
    :data:`~p2pexec.protocol.frames.ALIGN`-aligned address, and each buffer is laid out to start
    aligned there (:func:`pack_parts`): an array is used where it lies
    (:func:`_array`), every block of a pandas frame too.

    ``flat_in_c=False`` for an outcome: the client reads it with an
    allow-list, which a pickle inside the pickle would escape.

    ``frozen`` (a client's payload, sent later and maybe again): buffers
    whose memory the user could still change are copied now (not
    ``bytes``), so a task sees its arguments as they were when submitted,
    and a value matches its digest.
    """
    buf = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    pickler = TaskPickler(buf, protocol=PROTOCOL, buffer_callback=buffers.append, **options)
    pickler.flat_in_c = flat_in_c
    pickler.dump(obj)
    return pack_payload(buf, buffers, landing, frozen)


def pack_payload(buf: io.BytesIO, buffers: list[pickle.PickleBuffer], landing: int | None = None,
                 frozen: bool = True) -> list[Buffer]:
    """A pickle written to ``buf`` and its out-of-band ``buffers`` as a payload (see :func:`dump_payload`)."""
    return pack_parts([buf.getbuffer(), *(freeze(b.raw()) if frozen else b.raw() for b in buffers)], landing)


def freeze(view: memoryview) -> Buffer:
    """``view``, copied unless the memory behind it is a ``bytes`` (a read-only view may show memory that
    changes: a pandas column's ``to_numpy()``, a ``bytearray``'s ``toreadonly()``)."""
    owner = view.obj
    while isinstance(owner, memoryview):
        owner = owner.obj
    array = numpy_array_type()
    while array is not None and isinstance(owner, array) and owner.base is not None:
        owner = owner.base
    return view if type(owner) is bytes else bytes(view)


def _dumps_plain(obj: Any) -> list[Buffer]:
    """The C pickler, for data :func:`is_plain` accepted: nothing in it goes out of band."""
    return pack_parts([pickle.dumps(obj, protocol=PROTOCOL)])


def _loads(payload: Buffer, values: Sequence[Buffer] = ()) -> Any:
    main, *buffers = unpack_parts(payload)
    return _TaskUnpickler(io.BytesIO(main), values, buffers=buffers).load()


class _TaskUnpickler(dill.Unpickler):
    """Loads a task whose big values (:class:`~p2pexec.hoisting.Value`) came beside it (each one fresh, once a
    task), and names the Enum classes rebuilt here (an outcome is checked with it)."""

    def __init__(self, file: io.BytesIO, values: Sequence[Buffer], **options: Any) -> None:
        super().__init__(file, **options)
        self._values = values
        self._loaded: dict[int, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):  # an Enum rebuilt here goes by its name on the client's side
            rebuilt = enum_classes.named(module, name)
            if rebuilt is None:
                raise
            return rebuilt

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
        TaskPickler(buf, protocol=PROTOCOL, recurse=True).dump(fn)  # in-band: it is sent with every task
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


ATOMS = FLAT_ITEMS | {bytes}
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
        if kind in ATOMS:
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
    """The C pickler, refusing all but builtin data, one function (``allowed``) and what wraps it to run an
    initializer first: whether data is plain is found out while pickling it, at C speed.

    The C pickler asks ``reducer_override`` about every object except None,
    bools and exact ints, floats, bytes, str, dicts, sets, frozensets,
    lists, tuples, bytearrays and PickleBuffers; a PickleBuffer (which
    :func:`dump_payload` would send out of band) is refused by the buffer
    callback.  Big bytes are not refused here: callers check the size.
    """

    allowed: Any = None

    def reducer_override(self, obj: Any) -> Any:
        if obj is self.allowed or obj is _load_function or obj is Outcome or type(obj) is Outcome \
                or type(obj) is namespaces.Initialized or obj is namespaces.Initialized \
                or type(obj) is PrepickledFunction:  # (an initializer: plain_task)
            return NotImplemented  # its own reduction, or its name
        raise _NotPlain


def _refuse_buffer(_: Any) -> bool:
    raise _NotPlain


def has_big_bytes(*objs: Any) -> bool:
    """One of ``objs`` is bytes that must go out of band: pickling it in-band first, to find that out, would copy it."""
    return any(type(o) is bytes and len(o) >= OUT_OF_BAND for o in objs)


def plain_pickle(obj: Any, allowed: Any = None) -> bytes | None:
    """``obj`` pickled by the C pickler if it is builtin data only (apart from ``allowed``), else None."""
    buf = io.BytesIO()
    pickler = _PlainPickler(buf, protocol=PROTOCOL, buffer_callback=_refuse_buffer)
    pickler.allowed = allowed
    try:
        pickler.dump(obj)
    except (_NotPlain, RecursionError, pickle.PicklingError):
        return None
    return buf.getvalue()


def dump_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              plain: bool | None = None) -> list[Buffer]:
    """The task's payload; ``plain`` is :func:`is_plain` of ``(args, kwargs)`` when the caller knows it already."""
    if isinstance(fn, PrepickledFunction) and (is_plain((args, kwargs)) if plain is None else plain):
        return _dumps_plain((fn, args, kwargs))  # the common map case: the C pickler, 20x faster
    # recurse=True pickles only the globals a function uses, so functions
    # from a user's __main__ travel without dragging the whole module along.
    return dump_payload((fn, args, kwargs), recurse=True)


def load_task(payload: Buffer, values: Sequence[Buffer] = ()) -> tuple[Callable[..., Any], tuple[Any, ...],
                                                                       dict[str, Any]]:
    """A task, in the task process; ``values`` are the payloads of the big values it refers to, in order."""
    return _loads(payload, values)




# -- outcomes: a task's result or exception, and what it printed ------------------------------------------
def _rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class RemoteError(Exception):
    """Stands in for a task's exception that could not be pickled on the worker or rebuilt here; its
    message names the original type and says what it said (``p2pexec.RemoteError``)."""


class Sealed(type):
    """A class no one sets attributes on once it is made, a pickle's BUILD included: the client unpickles
    every result into an :class:`Outcome`, and need not check it is as it was after each (results.py)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        if cls.__dict__.get("_sealed_"):
            raise TypeError(f"{cls.__qualname__} is sealed")
        super().__setattr__(name, value)


@dataclass
class Outcome(metaclass=Sealed):
    """A task's result or exception, plus what it printed and logged (:mod:`p2pexec.task_logs`)."""

    ok: bool
    value: Any
    stdout: str = ""
    stderr: str = ""
    records: tuple[Any, ...] = ()


Outcome.__slotnames__ = []  # (pickle's cache of it: sealed, it was looked for each time)
Outcome._sealed_ = True  # (after @dataclass, which sets its methods)


def dump_outcome(ok: bool, value: Any, stdout: str, stderr: str, records: tuple[Any, ...] = (),
                 by_chunk: bool = False) -> list[Buffer]:
    """Pickle a task's outcome; an exception keeps its formatted traceback.  ``by_chunk``: ``value`` is a
    map's chunks' results (:func:`~p2pexec.chunks.run_chunks`), of which only those that cannot be pickled
    fail."""
    if not ok:
        value = remote_exception(value)
    outcome = Outcome(ok, value, stdout, stderr, records)
    if ok and not has_big_bytes(value):
        main = plain_pickle(outcome)  # builtin data: the C pickler, and nothing else to check
        if main is not None and (len(main) < OUT_OF_BAND or is_plain(value)):  # (big bytes go out of band)
            return pack_parts([main])
    try:
        return dump_payload(outcome, landing=OP_HEADER_BYTES, frozen=False, flat_in_c=False)  # (sent at once)
    except Exception as exc:
        if not ok:
            raise
        if by_chunk:
            seconds, parts = value
            return dump_outcome(True, (seconds, [_picklable(part) for part in parts]), stdout, stderr, records)
        return dump_outcome(False, _unpicklable(exc), stdout, stderr, records)


def _unpicklable(exc: Exception) -> TypeError:
    return TypeError(f"the task's return value could not be pickled: {exc!r}")


def _picklable(part: Any) -> Any:
    """A chunk's results, or the error that they could not be pickled."""
    try:
        dump_payload(part, flat_in_c=False)
    except Exception as exc:
        return remote_exception(_unpicklable(exc))
    return part


def load_outcome(payload: Buffer, trusted: bool = True, result_types: Collection[str] = (),
                 packages: Collection[str] = ()) -> Outcome:
    """A task's outcome; unless ``trusted``, unpickled with :mod:`p2pexec.results`' allow-list."""
    from .results import load, load_trusted  # (it imports this module)

    main, *buffers = unpack_parts(payload)
    if buffers and memoryview(memoryview(payload).obj).nbytes > 2 * nbytes(payload):
        buffers = [memoryview(copied(b, bytearray)) for b in buffers]  # batched: in place, it would keep them all
    outcome = load_trusted(main, buffers) if trusted else load(main, buffers, result_types, packages)
    if not isinstance(outcome, Outcome):
        raise TypeError(f"a worker returned {type(outcome).__name__}, not a task outcome")
    return outcome


def remote_exception(exc: BaseException) -> _ExceptionWithTraceback:
    """``exc`` as it travels to the client: raised there with its formatted traceback as the cause, or as
    a :class:`RemoteError` if the client could not rebuild it."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:  # the client must be able to rebuild it, not merely we to pickle it
        _loads(b"".join(dump_payload(exc, flat_in_c=False)))  # (as the outcome will be: a client's Enum too)
    except Exception:
        exc = RemoteError(f"{type(exc).__qualname__}: {exc}")
    return _ExceptionWithTraceback(exc, f'\n"""\n{tb}"""')


class _ExceptionWithTraceback:
    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exception, (self.exc, self.tb)

