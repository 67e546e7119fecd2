"""Big values cross once per worker, on real workers: counted, isolated per task and per member, never lost."""

from __future__ import annotations

import hashlib
import os

import pytest

from p2pexec import LocalCluster

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def digest_of(data):
    return hashlib.sha256(data).hexdigest()


def scribble(data, i):
    """Read the argument, then spoil it: the next task on this slot must not see the damage."""
    before = digest_of(data)
    if not isinstance(data, bytes):
        data[:] = bytes(len(data)) if isinstance(data, bytearray) else 0
    return before, i


def test_a_big_argument_crosses_once_per_worker(cluster):
    data = os.urandom(2 * MIB)
    with cluster.executor() as ex:
        out = list(ex.map(scribble, [data] * 20, range(20)))
        stats = ex.stats()
    assert out == [(digest_of(data), i) for i in range(20)]
    workers = len(stats.workers)
    assert 1 <= stats.values_sent <= workers <= 2
    assert stats.value_bytes_sent < workers * 2.01 * MIB
    assert stats.bytes_sent < stats.value_bytes_sent + 20 * 64 * 1024  # the tasks themselves are small


def test_a_big_argument_crosses_once_to_a_worker_whose_slots_went_to_two_leases():
    """The second lease's task waits for the value the first is sending, then tells the worker it may still
    be arriving: it went twice, one run in two, before (and every time in this order)."""
    data = os.urandom(48 * MIB)
    with LocalCluster(workers=1, slots=2) as lc, lc.executor() as ex:
        first = ex.submit(digest_of, data)  # a lease of one slot: the demand was one task
        wait_until(first.running, what="the first task to be sent")
        rest = list(ex.map(digest_of, [data] * 5))  # the demand grows: a second lease, on the other slot
        stats = ex.stats()
        assert [first.result(timeout=60), *rest] == [digest_of(data)] * 6
    assert (stats.values_sent, stats.values_missed) == (1, 0)
    assert stats.value_bytes_sent < 49 * MIB


def test_each_task_gets_its_own_copy_of_a_big_array(cluster):
    np = pytest.importorskip("numpy")
    array = np.arange(2 * MIB // 8, dtype=np.float64)
    expected = digest_of(array.tobytes())

    def use(a, i):
        before = digest_of(a.tobytes())
        a[:] = -1  # writes into its own copy, never the cached value or the next task's
        return before, i

    with cluster.executor() as ex:
        out = list(ex.map(use, [array] * 20, range(20)))
        mutable = list(ex.map(scribble, [bytearray(array.tobytes())] * 6, range(6)))
        assert ex.stats().values_sent <= 4
    assert out == [(expected, i) for i in range(20)]
    assert mutable == [(expected, i) for i in range(6)]
    assert (array == np.arange(2 * MIB // 8)).all()


def lies_in(a):
    """Where an array's memory is: the object it belongs to, and what that is a view of."""
    import numpy as np

    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return type(base).__name__, type(getattr(base, "obj", None)).__name__, bool(a.flags.aligned), float(a.sum())


def test_an_array_argument_is_used_where_it_landed_and_results_are_arrays_like_local_ones(cluster):
    np = pytest.importorskip("numpy")
    from p2pexec.worker.hop import shared

    array = np.random.default_rng(2).random(2 * MIB // 8).reshape(-1, 8)
    with cluster.executor() as ex:
        where = list(ex.map(lies_in, [array] * 4))
        doubled = ex.submit(np.multiply, array, 2).result(timeout=60)
    # the worker's shared memory, mapped privately (or where the task process read it: P2PEXEC_PORTABLE=1)
    expected = ("memoryview", "mmap" if shared() else "bytearray", True, float(array.sum()))  # the same bits
    assert where == [expected] * 4
    assert doubled.flags.writeable and (doubled == array * 2).all()
    assert lies_in(doubled) == ("memoryview", "mmap", True, float((array * 2).sum()))  # the message it came in


def test_a_closure_over_a_big_object_crosses_once(cluster):
    np = pytest.importorskip("numpy")
    model = np.random.default_rng(1).random(3 * MIB // 8)
    table = {i: str(i) for i in range(150_000)}  # no array: found by the size of its pickle
    with cluster.executor() as ex:
        assert list(ex.map(lambda i: float(model[i]), range(20))) == [float(model[i]) for i in range(20)]
        first = ex.stats().values_sent
        assert 1 <= first <= 2
        assert list(ex.map(lambda i: table[i * 1000], range(20))) == [str(i * 1000) for i in range(20)]
        assert 1 <= ex.stats().values_sent - first <= 2
        assert ex.submit(lambda: len(table) + model.size).result(timeout=60) == len(table) + model.size


def test_tasks_complete_when_values_are_evicted_or_bigger_than_the_cache():
    a, b = os.urandom(2 * MIB), os.urandom(2 * MIB)
    huge = os.urandom(5 * MIB)
    with LocalCluster(workers=1, worker_options=("--cache-size", "3MiB")) as lc, lc.executor() as ex:
        values = [a, b] * 6  # both do not fit: each evicts the other
        assert list(ex.map(scribble, values, range(12))) == [(digest_of(v), i) for i, v in enumerate(values)]
        evicted = ex.stats()
        assert evicted.values_missed >= 1  # the worker said so, and the tasks went again with their values
        assert list(ex.map(scribble, [huge] * 5, range(5))) == [(digest_of(huge), i) for i in range(5)]
        assert ex.stats().done == 17 and ex.stats().failed == 0


def test_members_cannot_use_each_others_values():
    data = os.urandom(2 * MIB)
    with LocalCluster(workers=0) as lc:
        bob = lc.add_member("bob")
        lc.add_worker()
        with lc.executor() as alice:
            assert alice.submit(digest_of, data).result(timeout=60) == digest_of(data)  # now cached for alice
            assert alice.stats().values_sent == 1
        with lc.executor(**bob) as ex:
            assert ex.submit(len, b"warm").result(timeout=60) == 4
            peer = ex.stats().workers[0].peer
            from p2pexec.hoisting import Value

            # bob claims the worker holds the value (as if he could probe alice's): it answers UNCACHED
            name = Value.of(data).digest
            def claim() -> None:  # sent earlier on a lease of bob's, and a task that used it was answered
                sent = ex._scheduler.sent_values(peer)
                sent.sent(sent.to_send([name]), None, True)
                sent.answered([name])

            ex._runtime.run_sync(claim)
            assert ex.submit(digest_of, data).result(timeout=60) == digest_of(data)
            stats = ex.stats()
        assert stats.values_missed == 1 and stats.values_sent == 1  # then he sent it himself
