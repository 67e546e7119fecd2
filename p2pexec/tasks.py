"""What travels between a client and a task process: dill payloads and results.

The worker daemon forwards these bytes without ever unpickling them; only
the task process (on the worker) and the client do.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable

import dill

_PROTOCOL = 5


def dump_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    # recurse=True pickles only the globals a function uses, so functions
    # from a user's __main__ travel without dragging the whole module along.
    return dill.dumps((fn, args, kwargs), protocol=_PROTOCOL, recurse=True)


def load_task(payload: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    return dill.loads(payload)


class RemoteTraceback(Exception):
    """Carries the worker-side traceback as the ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


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


def dump_outcome(ok: bool, value: Any, stdout: str, stderr: str) -> bytes:
    """Pickle a task's outcome; an exception keeps its formatted traceback."""
    if not ok:
        tb = "".join(traceback.format_exception(type(value), value, value.__traceback__))
        tb = f'\n"""\n{tb}"""'
        try:
            dill.dumps(value, protocol=_PROTOCOL)
        except Exception:
            value = RemoteError(f"{type(value).__qualname__}: {value}")
        value = _ExceptionWithTraceback(value, tb)
    try:
        return dill.dumps(Outcome(ok, value, stdout, stderr), protocol=_PROTOCOL)
    except Exception as exc:
        if not ok:
            raise
        error = TypeError(f"the task's return value could not be pickled: {exc!r}")
        return dump_outcome(False, error, stdout, stderr)


def load_outcome(payload: bytes) -> Outcome:
    outcome = dill.loads(payload)
    if not isinstance(outcome, Outcome):
        raise TypeError(f"a worker returned {type(outcome).__name__}, not a task outcome")
    return outcome


class _ExceptionWithTraceback:
    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exception, (self.exc, self.tb)
