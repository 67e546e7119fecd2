"""A map's short chunks share tasks: results, exceptions and random streams as with one chunk a task.

The grouping follows the pace of the function's items, learned from its earlier maps or from the first
chunks of its first (``mapping.Paces``); these tests check the pure parts (how chunks are grouped, how a
task's chunks end each on its own) with hypothesis, then a real cluster: fewer tasks, the same results, the
exception of the first failing chunk after the items before it.
"""

from __future__ import annotations

import math
import time
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pexec import LocalCluster
from p2pexec.chunks import chained, grouped, numbered_chunks, run_chunk, run_chunks
from p2pexec.errors import RemoteTraceback
from p2pexec import mapping
from p2pexec.mapping import FEWEST_TASKS, MOST_CHUNKS, MOST_PACES, PROBES, TASK_BYTES, TASK_SECONDS, Paces
from p2pexec.tasks import dump_outcome, load_outcome

pytestmark = pytest.mark.timeout(180)


class Refused(Exception):
    pass


def refuse(bad: frozenset[int], x: int) -> int:
    if x in bad:
        raise Refused(f"refused {x}")
    return x * 2


def through_workers(tasks: list[list], run) -> object:
    """What ``Executor.map`` yields for ``tasks``, each run as a worker would and its outcome pickled."""
    for chunks in tasks:
        try:
            value = run_chunks(run, chunks)
        except Exception as exc:
            outcome = load_outcome(b"".join(dump_outcome(False, exc, "", "")))
            raise outcome.value  # as a failed future's result() does
        yield load_outcome(b"".join(dump_outcome(True, value, "", ""))).value


def one_chunk_a_task(items: list[int], chunksize: int, bad: frozenset[int]) -> tuple[list[int], str | None]:
    """What a pool's map gives: every item of the chunks before the first failing one, then its error."""
    out: list[int] = []
    for start in range(0, len(items), chunksize):
        chunk = items[start : start + chunksize]
        failing = [x for x in chunk if x in bad]
        if failing:
            return out, f"refused {failing[0]}"
        out.extend(x * 2 for x in chunk)
    return out, None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=60), st.integers(1, 7), st.integers(1, 9),
       st.frozensets(st.integers(0, 50), max_size=3))
def test_a_task_of_several_chunks_ends_as_a_task_of_each_would(items, chunksize, per_task, bad):
    learned: list[int] = []
    chunks = numbered_chunks(items, chunksize=chunksize)
    results = through_workers(list(grouped(chunks, per_task)), partial(run_chunk, partial(refuse, bad)))
    out: list[int] = []
    error = None
    try:
        for x in chained(results, lambda seconds, parts: learned.append(sum(map(len, parts)))):
            out.append(x)
    except Refused as exc:
        error = str(exc)
        assert isinstance(exc.__cause__, RemoteTraceback) and "refuse" in str(exc.__cause__)
    assert (out, error) == one_chunk_a_task(items, chunksize, bad)
    assert sum(learned) <= len(items)  # a task with a failed chunk teaches nothing
    if error is None:
        assert sum(learned) == len(items)


def leave(x: int) -> int:
    if x == 3:
        raise SystemExit(3)
    if x == 5:
        raise KeyboardInterrupt
    return x


def test_a_chunk_that_exits_ends_alone_but_an_interrupt_stops_the_task():
    seconds, parts = run_chunks(partial(run_chunk, leave), list(numbered_chunks(range(5), chunksize=2)))
    assert parts[0] == [0, 1] and parts[2] == [4]
    assert isinstance(parts[1].exc, SystemExit) and parts[1].exc.code == 3
    with pytest.raises(KeyboardInterrupt):
        run_chunks(partial(run_chunk, leave), list(numbered_chunks(range(7), chunksize=2)))


def chunks_of(n: int, chunksize: int = 10, item: object = 0) -> list:
    return list(numbered_chunks([item] * (n * chunksize), chunksize=chunksize))


def step(x: int) -> int:
    return x


def teach(paces: Paces, fn, seconds: float, items: int = 1000, result: object = 0) -> None:
    """Tell ``paces`` that ``items`` of ``fn`` took ``seconds`` in all, each returning ``result``."""
    paces.learner(fn)(seconds, [[result] * items])


def test_an_unknown_function_gets_a_task_a_chunk_and_nothing_is_read_ahead():
    chunks = iter(chunks_of(100))
    per_task, rest = Paces().grouping(step, chunks)
    assert per_task == 1 and rest is chunks and len(list(chunks)) == 100


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-9, 10.0), st.integers(0, 5000), st.integers(1, 100))
def test_tasks_stay_short_few_enough_and_many_enough(pace, n, chunksize):
    paces = Paces()
    teach(paces, step, pace * 1000)
    chunks = chunks_of(n, chunksize)
    per_task, rest = paces.grouping(step, iter(chunks))
    assert list(rest) == chunks  # the chunks read ahead come back first, in order
    assert 1 <= per_task <= MOST_CHUNKS
    if per_task > 1:
        assert per_task * pace * chunksize <= TASK_SECONDS * 1.0001
        assert math.ceil(n / per_task) >= FEWEST_TASKS


def test_big_arguments_or_results_keep_tasks_small():
    paces = Paces()
    teach(paces, step, 1e-9)
    chunk_bytes = 10 * 1033  # ten items of sys.getsizeof(b"x" * 1000)
    per_task, _ = paces.grouping(step, iter(chunks_of(3000, item=b"x" * 1000)))
    assert per_task == TASK_BYTES // chunk_bytes < MOST_CHUNKS
    assert paces.grouping(step, iter(chunks_of(3000)))[0] == MOST_CHUNKS
    paces = Paces()
    teach(paces, step, 1e-9, result=b"x" * 1000)
    assert paces.grouping(step, iter(chunks_of(3000)))[0] == TASK_BYTES // chunk_bytes


def test_lambdas_made_anew_share_one_pace_and_the_paces_are_bounded():
    paces = Paces()
    for _ in range(3):
        teach(paces, lambda x: x, 0.001)
    assert len(paces._paces) == 1
    for i in range(MOST_PACES + 10):
        fn = eval(f"lambda x: x + {i}")  # each its own code object
        teach(paces, fn, 0.001)
    assert len(paces._paces) == MOST_PACES


def test_the_pace_follows_change():
    paces = Paces()
    teach(paces, step, 1e-6 * 100, 100)
    assert paces.grouping(step, iter(chunks_of(5000)))[0] > 1
    for _ in range(20):  # the items got slow: 10 ms each
        teach(paces, step, 1.0, 100)
    assert paces.grouping(step, iter(chunks_of(5000)))[0] == 1


def test_results_come_in_order_and_what_is_left_is_cancelled_as_executor_map_does():
    from concurrent.futures import Future, TimeoutError

    from p2pexec.mapping import _in_order

    futures = [Future() for _ in range(4)]
    futures[0].set_result("a")
    results = _in_order(list(futures), None)
    assert next(results) == "a"
    results.close()  # the user stops reading: what did not run is cancelled
    assert all(f.cancelled() for f in futures[1:])
    futures = [Future() for _ in range(3)]
    futures[0].set_result("a")
    results = _in_order(list(futures), time.monotonic() + 0.05)
    assert next(results) == "a"
    with pytest.raises(TimeoutError):
        next(results)
    assert futures[1].cancelled() and futures[2].cancelled()


# -- on a real cluster ------------------------------------------------------------------------------------------
def square(x: int) -> int:
    return x * x


def fail_at_3333(x: int) -> int:
    if x == 3333:
        raise Refused(f"refused {x}")
    return x


class Counter:
    """A callable with state: each chunk starts from the client's copy, so it is never grouped."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        return self.calls


@pytest.fixture(scope="module")
def lc():
    with LocalCluster(workers=2, slots=1, sandbox=False) as cluster:
        yield cluster


def tasks_run(ex, call) -> tuple[object, int]:
    before = ex.stats().done
    out = call()
    return out, ex.stats().done - before


def test_a_map_after_one_that_showed_short_items_runs_in_far_fewer_tasks(lc, monkeypatch):
    monkeypatch.setattr(mapping, "PROBE_SECONDS", 0)  # no first chunk is back at once: a chunk a task
    with lc.executor() as ex:
        out, first = tasks_run(ex, lambda: list(ex.map(square, range(20_000), chunksize=10)))
        assert out == [x * x for x in range(20_000)] and first == 2000
        out, second = tasks_run(ex, lambda: list(ex.map(square, range(20_000), chunksize=10)))
        assert out == [x * x for x in range(20_000)]
        assert FEWEST_TASKS <= second <= 2000 / 4


def test_a_first_map_is_grouped_by_the_pace_of_its_first_chunks(lc, monkeypatch):
    monkeypatch.setattr(mapping, "PROBE_SECONDS", 60)  # (however loaded the machine: this tests the grouping)
    with lc.executor() as ex:
        out, tasks = tasks_run(ex, lambda: list(ex.map(square, range(20_000), chunksize=10)))
        assert out == [x * x for x in range(20_000)]
        assert PROBES + FEWEST_TASKS <= tasks <= 2000 / 4


def nap(x: int) -> int:
    import time

    time.sleep(0.01)
    return x


def test_slow_items_keep_a_chunk_a_task(lc, monkeypatch):
    monkeypatch.setattr(mapping, "PROBE_SECONDS", 60)
    with lc.executor() as ex:
        assert tasks_run(ex, lambda: list(ex.map(nap, range(80))))[1] == 80  # first map: its probes tell
        assert tasks_run(ex, lambda: list(ex.map(nap, range(80))))[1] == 80  # then its pace


def test_a_failing_chunk_in_a_shared_task_raises_after_the_items_before_it(lc):
    with lc.executor() as ex:
        assert list(ex.map(fail_at_3333, range(3000), chunksize=5)) == list(range(3000))
        got = []
        with pytest.raises(Refused, match="refused 3333") as raised:
            for x in ex.map(fail_at_3333, range(5000), chunksize=5):
                got.append(x)
        assert got == list(range(3330))  # the chunks before the failing one, some of which shared its task
        assert isinstance(raised.value.__cause__, RemoteTraceback)
        assert ex.stats().done < 600 + 1000 / 4  # (600 tasks for the first map: the second was grouped)


def test_a_grouped_seeded_map_draws_what_one_chunk_a_task_draws(lc):
    def draws(**options) -> tuple[list, int]:
        with lc.executor(seed=11, **options) as ex:
            list(ex.map(draw, range(3000), chunksize=3))  # learns draw's pace (grouped maps: after this one)
            return tasks_run(ex, lambda: list(ex.map(draw, range(3000), chunksize=3)))

    grouped_draws, tasks = draws()
    assert tasks < 1000
    single_draws, single_tasks = draws(task_timeout=60)  # each task timed on its own: never grouped
    assert single_tasks == 1000
    assert grouped_draws == single_draws


def draw(_: int) -> float:
    import p2pexec

    return float(p2pexec.task_rng().random())


def test_a_function_with_state_and_an_executor_counting_tasks_are_never_grouped(lc):
    with lc.executor() as ex:
        counter = Counter()
        for _ in range(2):
            out, tasks = tasks_run(ex, lambda: list(ex.map(counter, range(400), chunksize=4)))
            assert out == [1, 2, 3, 4] * 100 and tasks == 100  # each chunk from the client's copy
    with lc.executor(max_tasks_per_child=1000) as ex:
        for _ in range(2):
            assert tasks_run(ex, lambda: list(ex.map(square, range(400), chunksize=4)))[1] == 100
