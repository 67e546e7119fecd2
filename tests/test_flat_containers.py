"""Long flat lists, tuples and dicts of numbers and strings in a task go in one piece through the C pickler
(task_dispatch._save_flat): dill's pure-Python pickler took 130 ms a submit for a function using a 20,000-item
global table, and 200 ms for a long list beside one argument that is not plain data."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pexec.results import UntrustedResultError
from p2pexec.task_dispatch import FLAT_MIN, _plain
from p2pexec.tasks import dump_outcome, dump_task, load_outcome, load_task

atoms = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.booleans(), st.none(),
                  st.complex_numbers(allow_nan=False))
sizes = {"min_size": FLAT_MIN - 2, "max_size": FLAT_MIN + 2}  # on both sides of the threshold


class Marker:  # a class of the test's own: the arguments are not plain data, so dill pickles them
    def __eq__(self, other: object) -> bool:
        return type(other).__name__ == "Marker"  # (a task process has its own class of that name)


def _round_trip(*args):
    payload = b"".join(bytes(p) for p in dump_task(len, args, {}))
    return load_task(payload)[1], payload


@settings(max_examples=30, deadline=None)
@given(st.lists(atoms, **sizes), st.lists(atoms, **sizes).map(tuple),
       st.dictionaries(st.one_of(st.integers(), st.text(max_size=5)), atoms, **sizes))
def test_flat_containers_come_back_equal_and_of_their_type(items, row, table):
    (got_items, got_row, got_table, marker), payload = _round_trip(items, row, table, Marker())
    assert got_items == items and type(got_items) is list
    assert got_row == row and type(got_row) is tuple
    assert got_table == table and type(got_table) is dict and list(got_table) == list(table)
    assert marker == Marker()
    assert (b"_plain" in payload) == (len(items) >= FLAT_MIN or len(row) >= FLAT_MIN or len(table) >= FLAT_MIN)


def test_one_flat_list_twice_is_one_list_there_too():
    shared = list(range(FLAT_MIN * 2))
    (first, second, nested, _), _ = _round_trip(shared, shared, [shared], Marker())
    assert first is second is nested[0] and first == shared


def test_what_is_not_flat_goes_dills_way():
    """A container that holds a container or any other object may share it with the rest of the pickle."""
    inner = [1, 2]
    rows = [inner] * FLAT_MIN
    flags = [math.nan, Marker()] * FLAT_MIN
    (got_rows, got_flags, got_inner), payload = _round_trip(rows, flags, inner)
    assert b"_plain" not in payload
    assert all(row is got_inner for row in got_rows) and got_flags[1] == Marker()


def test_an_outcome_never_carries_a_pickle_inside_its_pickle():
    """The client reads results with an allow-list, which a pickle loaded by _plain would escape."""
    value = (list(range(FLAT_MIN * 4)), Marker())
    payload = b"".join(bytes(p) for p in dump_outcome(True, value, "", ""))
    assert b"_plain" not in payload
    assert load_outcome(payload, trusted=False).value[0] == value[0]
    smuggled = b"".join(bytes(p) for p in dump_outcome(True, _Smuggler(), "", ""))
    with pytest.raises(UntrustedResultError, match="_plain"):  # a worker that tries it anyway
        load_outcome(smuggled, trusted=False)


class _Smuggler:
    def __reduce__(self):
        return _plain, (pickle.dumps([1, 2]),)
