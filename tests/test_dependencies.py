"""Futures as task arguments: replaced by their results before the task is sent, failures passed on."""

from __future__ import annotations

import threading
from collections import namedtuple
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pexec import LocalCluster
from p2pexec.dependencies import futures_in, resolved

pytestmark = pytest.mark.timeout(120)
Pair = namedtuple("Pair", "a b")


def done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


nested = st.recursive(st.integers(), lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=20)


def _wrap(value):
    """The same structure with every integer turned into a finished future of it."""
    if isinstance(value, int):
        return done(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return {k: _wrap(v) for k, v in value.items()}


@given(nested)
def test_every_future_in_lists_tuples_and_dicts_is_found_and_replaced(value):
    wrapped = _wrap(value)
    assert resolved(wrapped) == value
    assert len(futures_in(wrapped)) == _leaves(value)


def _leaves(value) -> int:
    if isinstance(value, int):
        return 1
    return sum(_leaves(v) for v in (value.values() if isinstance(value, dict) else value))


def test_namedtuples_keep_their_type_and_other_objects_are_left_alone():
    class Box:
        def __init__(self, f):
            self.f = f

    from collections import Counter

    box, counts = Box(done(1)), Counter("aab")
    out = resolved((Pair(done(1), [done(2)]), box, counts))
    assert out == (Pair(1, [2]), box, counts) and type(out[0]) is Pair and out[1].f is box.f
    assert out[2] is counts  # a container without futures reaches the task as it is
    assert futures_in(box) == []


def inc(x: int) -> int:
    return x + 1


def add_all(xs, extra) -> int:
    return sum(xs) + sum(extra.values())


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("no")


@pytest.fixture(scope="module")
def one_slot():
    with LocalCluster(workers=1) as lc, lc.executor() as ex:
        yield ex


def test_futures_in_arguments_become_their_results(one_slot):
    ex = one_slot
    one = ex.submit(inc, 0)
    with ThreadPoolExecutor(1) as threads:
        local = threads.submit(lambda: 10)  # a future of any executor
        total = ex.submit(add_all, [one, local, 5], {"k": ex.submit(inc, one)})
        assert total.result(timeout=60) == 1 + 10 + 5 + 2


def test_a_failed_dependency_fails_the_dependent_with_the_same_exception(one_slot):
    failed = one_slot.submit(boom)
    dependent = one_slot.submit(inc, failed)
    with pytest.raises(Boom):
        dependent.result(timeout=60)
    assert dependent.exception() is failed.exception()


def test_a_waiting_task_holds_no_worker(one_slot):
    gate = threading.Event()
    with ThreadPoolExecutor(1) as threads:
        slow = threads.submit(lambda: gate.wait(60) and 41)
        waiting = one_slot.submit(inc, slow)
        assert one_slot.submit(inc, 1).result(timeout=60) == 2  # the only slot is free meanwhile
        assert not waiting.done()
        gate.set()
        assert waiting.result(timeout=60) == 42


def test_a_chain_of_a_thousand_dependent_tasks_completes(one_slot):
    link = one_slot.submit(inc, 0)
    for _ in range(999):
        link = one_slot.submit(inc, link)
    assert link.result(timeout=100) == 1000


def test_a_waiting_task_can_be_interrupted_and_is_cancelled_by_shutdown(one_slot):
    gate = threading.Event()
    with ThreadPoolExecutor(1) as threads:
        slow = threads.submit(gate.wait, 60)
        waiting = one_slot.submit(inc, slow)
        assert one_slot.interrupt(waiting) and waiting.cancelled()
        with LocalCluster(workers=1) as lc:
            ex = lc.executor()
            later = ex.submit(inc, slow)
            ex.shutdown(wait=True, cancel_futures=True)
            assert later.cancelled()
        gate.set()


def test_futures_are_found_in_linear_time_and_cycles_end():
    many = [Future() for _ in range(20_000)]
    assert futures_in((many + many, {})) == many  # (was quadratic: minutes at this size)
    loop: list[object] = [many[0]]
    loop.append(loop)
    assert futures_in(loop) == [many[0]]
