"""Futures among a task's arguments: found before it is sent, replaced by their results.

Pure: no threads.  Futures are looked for at top level and inside lists,
tuples and dict values (the containers users build by hand); anything else
travels as it is.
"""

from __future__ import annotations

from concurrent.futures import CancelledError, Future
from typing import Any


def futures_in(value: Any, found: list[Future[Any]] | None = None) -> list[Future[Any]]:
    """Every Future inside ``value`` (lists, tuples and dict values, nested), in order, each once."""
    found = [] if found is None else found
    if isinstance(value, Future):
        if not any(value is f for f in found):
            found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            futures_in(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            futures_in(item, found)
    return found


def resolved(value: Any) -> Any:
    """``value`` with each (finished) Future replaced by its result, in one pass.

    A container is rebuilt (as the same type where it can be) only when something in it changed, so
    every other argument reaches the task as it is: a ``Counter`` without futures stays that object.
    """
    if isinstance(value, Future):
        return value.result(timeout=0)
    if isinstance(value, (list, tuple)):
        items = [resolved(item) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
    if isinstance(value, dict):
        pairs = {k: resolved(v) for k, v in value.items()}
        return value if all(pairs[k] is v for k, v in value.items()) else pairs
    return value


def first_failure(futures: list[Future[Any]]) -> BaseException | None:
    """The exception a dependent task fails with: its first failed (or cancelled) argument's."""
    for future in futures:
        if future.cancelled():
            return CancelledError("a future this task depends on was cancelled")
        if future.exception(timeout=0) is not None:
            return future.exception(timeout=0)
    return None
