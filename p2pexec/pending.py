"""The client's queue of work not yet sent, one line per resource need.

Tasks of different needs go to different leases, so a lease takes from
its own need's line in O(1) however long the others are.  Submitting
threads append while the event loop takes: each line is a deque, whose
``append`` and ``popleft`` are atomic, and a line is created under a lock.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from .protocol.resources import Need


class _HasNeed(Protocol):
    need: Need


T = TypeVar("T", bound=_HasNeed)


class Pending(Generic[T]):
    def __init__(self) -> None:
        self._lines: dict[Need, deque[T]] = {}
        self._lock = threading.Lock()

    def _line(self, need: Need) -> deque[T]:
        line = self._lines.get(need)
        if line is None:
            with self._lock:
                line = self._lines.setdefault(need, deque())
        return line

    def append(self, item: T) -> None:
        """Last in its need's line (any thread)."""
        self._line(item.need).append(item)

    def appendleft(self, item: T) -> None:
        """First in its need's line: work that comes back runs before newer work."""
        self._line(item.need).appendleft(item)

    def take(self, need: Need) -> T | None:
        line = self._lines.get(need)
        return line.popleft() if line else None

    def popleft(self) -> T:
        """The head of any non-empty line (for draining them all)."""
        for line in list(self._lines.values()):
            if line:
                return line.popleft()
        raise IndexError("no pending work")

    def remove(self, item: T) -> None:
        self._lines[item.need].remove(item)

    def head(self, need: Need, count: int) -> list[T]:
        """The first ``count`` tasks waiting with ``need`` (a copy, taken in one step)."""
        return list(itertools.islice(self._lines.get(need, ()), count))

    def count(self, need: Need) -> int:
        line = self._lines.get(need)
        return len(line) if line else 0

    def needs(self) -> list[Need]:
        """Needs with work waiting."""
        return [need for need, line in list(self._lines.items()) if line]

    def __len__(self) -> int:
        return sum(len(line) for line in list(self._lines.values()))

    def __bool__(self) -> bool:
        return any(list(self._lines.values()))

    def __iter__(self) -> Iterator[T]:
        for line in list(self._lines.values()):
            yield from list(line)
