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
import traceback
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import dill
import dill._dill

from .errors import RemoteTraceback
from .protocol.frames import Buffer, pack_parts, unpack_parts

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


def _loads(payload: Buffer) -> Any:
    main, *buffers = unpack_parts(payload)
    return dill.loads(main, buffers=buffers)


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


def load_task(payload: Buffer) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    return _loads(payload)


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
