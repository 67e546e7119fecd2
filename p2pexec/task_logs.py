"""A task's log records, sent home and handled by the client's loggers, so the client's logging config decides.

In a task process, :class:`Recorder` (the root logger's handler, root at
INFO) keeps the records of the task that runs as plain data; the client
hands each to its own logger of that name (:func:`replay`), or to the
nearest one it has: a worker never makes the client create loggers.
Before, a task's ``log.info`` went nowhere and its warnings came back
bare on stderr, whatever format the client had set.
"""

from __future__ import annotations

import logging
from typing import Any

KEPT_RECORDS = 1000  # of one task; more are counted, and the count is logged
KEPT_CHARACTERS = 100_000  # of one record's message, and of its traceback
KEPT_TOTAL = 10_000_000  # characters of all of one task's records that the client handles

#: (logger name, level, message, time created, path, line, function, traceback, stack)
Data = tuple[str, int, str, float, str, int, str, str, str]


class Recorder(logging.Handler):
    """Keeps the records of the running task (:meth:`take` them after it)."""

    def __init__(self) -> None:
        super().__init__()
        self._records: list[Data] = []
        self._dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._records) >= KEPT_RECORDS:
            self._dropped += 1
            return
        try:
            message = record.getMessage()
        except Exception:  # (as logging itself would report: a message and arguments that do not fit)
            message = f"{record.msg!r} % {record.args!r} (its arguments did not fit its message)"
        trace = record.exc_text or (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        self._records.append((record.name, record.levelno, _cut(message), record.created, record.pathname,
                              record.lineno, record.funcName or "", _cut(trace), _cut(record.stack_info or "")))

    def take(self) -> tuple[Data, ...]:
        records, self._records = self._records, []
        if self._dropped:
            records.append((records[-1][0], logging.WARNING, f"{self._dropped} more log records of this task were "
                            f"dropped: it logged more than {KEPT_RECORDS}", records[-1][3], "", 0, "", "", ""))
            self._dropped = 0
        return tuple(records)


def _cut(text: str) -> str:
    return text if len(text) <= KEPT_CHARACTERS else text[:KEPT_CHARACTERS] + _CUT_NOTE


_CUT_NOTE = " [p2pexec: cut here]"


def record_here(root: logging.Logger = logging.root) -> Recorder:
    """In a task process: record what is logged at INFO and above, and nothing else prints it."""
    recorder = Recorder()
    root.addHandler(recorder)
    root.setLevel(logging.INFO)
    return recorder


def replay(records: Any, worker: str) -> None:
    """Hand a task's ``records`` (from a worker: checked here, and held to the worker's limits) to this
    process's loggers; never p2pexec's own (a worker cannot speak for this client)."""
    if type(records) is not tuple:
        return
    budget = KEPT_TOTAL
    for data in records[:KEPT_RECORDS + 1]:  # (a pickle may name one record a million times)
        if not _well_formed(data) or data[0].partition(".")[0] == "p2pexec":
            continue
        name, level, message, created, path, line, function, trace, stack = data
        budget -= len(message) + len(trace) + len(stack)
        if budget < 0:
            break
        logger = _nearest(name)
        if not logger.isEnabledFor(level):
            continue
        record = logging.LogRecord(name, level, path, line, message, None, None, function, stack or None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        record.exc_text = trace or None
        record.worker = worker  # (for a format's %(worker)s)
        logger.handle(record)


_TYPES = (str, int, str, float, str, int, str, str, str)


def _well_formed(data: Any) -> bool:
    return (type(data) is tuple and len(data) == len(_TYPES) and all(type(x) is t for x, t in zip(data, _TYPES))
            and 0 <= data[1] <= 100 and len(data[0]) <= 200 and 0 <= data[3] < 1e11  # (a time: not inf or nan)
            and all(len(x) <= _CUT_LENGTH for x in data if type(x) is str))


_CUT_LENGTH = KEPT_CHARACTERS + 30  # a message or traceback cut by the worker, with its note


def _nearest(name: str) -> logging.Logger:
    """The logger of that name if this process has one, else its nearest ancestor here (root at last)."""
    loggers = logging.Logger.manager.loggerDict
    while name:
        found = loggers.get(name)
        if isinstance(found, logging.Logger):
            return found
        name = name.rpartition(".")[0]
    return logging.root
