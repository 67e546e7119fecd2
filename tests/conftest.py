"""Shared fixtures: one real LocalCluster (embedded SSH board + 2 worker daemons) per session."""

from __future__ import annotations

import pytest

from p2pexec import LocalCluster


@pytest.fixture(scope="session")
def cluster():
    with LocalCluster(workers=2) as lc:
        yield lc


@pytest.fixture
def executor(cluster):
    with cluster.executor() as ex:
        yield ex


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Wait for a condition that offers no event to wait on; fail loudly after ``timeout``."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        tick.wait(0.01)
