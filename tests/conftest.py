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
