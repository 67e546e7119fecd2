"""What one task needs installed where it runs: kept apart from :mod:`.fitting` so the client's pure
core can hold it without importing ``importlib.metadata`` (which pulls in ``socket``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskEnv:
    """What one task needs installed where it runs."""

    needs: Mapping[str, str]  # canonical distribution -> the client's version
    modules: frozenset[str]  # top-level modules its pickle names

    def with_module(self, module: str) -> TaskEnv:
        return TaskEnv(self.needs, self.modules | {module})


NOTHING = TaskEnv({}, frozenset())
