"""Modules of the user's own code travel by value when a task refers to them (``from mypkg import consts``):
a worker cannot import them (they were reported as a missing package ``mypkg?``)."""

from __future__ import annotations

import pytest

from tests.localpkg import consts, helpers

pytestmark = pytest.mark.timeout(120)


def test_a_function_using_a_sibling_module_runs_and_sees_its_current_values(executor, monkeypatch):
    assert executor.submit(helpers.scaled, 2).result(timeout=60) == 6
    monkeypatch.setattr(consts, "FACTOR", 5)  # sent again, not an old pickle of the module reused
    assert executor.submit(helpers.scaled, 2).result(timeout=60) == 10
    assert list(executor.map(helpers.scaled, [1, 2])) == [5, 10]


def test_a_module_level_lock_of_code_sent_by_value_is_the_workers_own(executor):
    """Code brings its own locks, as importing it on the worker would; only data may not carry one."""
    assert executor.submit(helpers.locked_double, 4).result(timeout=60) == 8
    assert executor.submit(lambda: helpers._lock.locked()).result(timeout=60) is False
