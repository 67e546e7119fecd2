"""A map's short chunks share tasks: results, exceptions and random streams as with one chunk a task.

The grouping follows the pace of the function's items, learned from its earlier maps or from the first
chunks of its first (``mapping.Paces``); these tests check the pure parts (how chunks are grouped, how a
task's chunks end each on its own) with hypothesis, then a real cluster: fewer tasks, the same results, the
exception of the first failing chunk after the items before it.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pexec import LocalCluster, mapping
from p2pexec.chunks import chained, grouped, numbered_chunks, run_chunk, run_chunks
from p2pexec.errors import RemoteTraceback
from p2pexec.mapping import FEWEST_TASKS, MOST_CHUNKS, MOST_PACES, PROBES, TASK_BYTES, TASK_SECONDS, Paces
from p2pexec.tasks import dump_outcome, load_outcome

from .conftest import wait_until

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
        raise KeyboardInterrupt  # (a task process ignores SIGINT: only the function raises one)
    return x


def test_a_chunk_that_exits_or_raises_keyboardinterrupt_ends_alone():
    seconds, parts = run_chunks(partial(run_chunk, leave), list(numbered_chunks(range(7), chunksize=2)))
    assert parts[0] == [0, 1] and parts[3] == [6]
    assert isinstance(parts[1].exc, SystemExit) and parts[1].exc.code == 3
    assert isinstance(parts[2].exc, KeyboardInterrupt)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("not this one")


def lock_at(bad: int, x: int) -> object:
    return Unpicklable() if x == bad else x


def test_a_chunk_whose_results_cannot_be_pickled_fails_alone():
    value = run_chunks(partial(run_chunk, partial(lock_at, 3)), list(numbered_chunks(range(7), chunksize=2)))
    outcome = load_outcome(b"".join(dump_outcome(True, value, "", "", by_chunk=True)))
    seconds, parts = outcome.value
    assert outcome.ok and parts[0] == [0, 1] and parts[2:] == [[4, 5], [6]]
    assert isinstance(parts[1], TypeError) and "could not be pickled" in str(parts[1])
    alone = load_outcome(b"".join(dump_outcome(True, value, "", "")))  # any other task: it fails as a whole
    assert not alone.ok and isinstance(alone.value, TypeError)


def chunks_of(n: int, chunksize: int = 10, item: object = 0) -> list:
    return list(numbered_chunks([item] * (n * chunksize), chunksize=chunksize))


def step(x: int) -> int:
    return x


def teach(paces: Paces, fn, seconds: float, items: int = 1000, result: object = 0) -> None:
    """Tell ``paces`` that ``items`` of ``fn`` took ``seconds`` in all, each returning ``result``."""
    paces.learner(fn)(seconds, [[result] * items])


def group(paces: Paces, chunks: list, probed: tuple[float, float] | None, fn=step) -> int:
    per_task, rest = paces.grouping(fn, iter(chunks), probed, FEWEST_TASKS)
    assert list(rest) == chunks  # the chunks read ahead come back first, in order
    return per_task


def test_a_map_whose_first_chunks_are_not_back_gets_a_task_a_chunk_and_nothing_is_read_ahead():
    paces = Paces()
    teach(paces, step, 1e-6)  # (its earlier maps were short: not enough)
    chunks = iter(chunks_of(100))
    per_task, rest = paces.grouping(step, chunks, None, FEWEST_TASKS)
    assert per_task == 1 and rest is chunks and len(list(chunks)) == 100


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-9, 10.0), st.integers(0, 5000), st.integers(1, 100), st.integers(FEWEST_TASKS, 200))
def test_tasks_stay_short_few_enough_and_many_enough(pace, n, chunksize, fewest):
    chunks = chunks_of(n, chunksize)
    per_task, rest = Paces().grouping(step, iter(chunks), (pace, 28), fewest)
    assert list(rest) == chunks
    assert 1 <= per_task <= MOST_CHUNKS
    if per_task > 1:
        assert per_task * pace * chunksize <= TASK_SECONDS * 1.0001
        assert math.ceil(n / per_task) >= fewest


def test_big_arguments_or_results_keep_tasks_small():
    chunk_bytes = 10 * 1033  # ten items of sys.getsizeof(b"x" * 1000)
    assert group(Paces(), chunks_of(3000, item=b"x" * 1000), (1e-9, 28)) == TASK_BYTES // chunk_bytes < MOST_CHUNKS
    assert group(Paces(), chunks_of(3000), (1e-9, 28)) == MOST_CHUNKS
    assert group(Paces(), chunks_of(3000), (1e-9, 1033)) == TASK_BYTES // chunk_bytes
    within = [b"x" * 100_000]  # a list's items count too
    assert group(Paces(), chunks_of(3000, item=within), (1e-9, 28)) == 1


def test_lambdas_made_anew_share_one_pace_and_the_paces_are_bounded():
    paces = Paces()
    for _ in range(3):
        teach(paces, lambda x: x, 0.001)
    assert len(paces._paces) == 1
    for i in range(MOST_PACES + 10):
        fn = eval(f"lambda x: x + {i}")  # each its own code object
        teach(paces, fn, 0.001)
    assert len(paces._paces) == MOST_PACES


def test_the_slower_of_this_map_and_the_earlier_ones_decides():
    paces = Paces()
    fast, slow = (1e-8, 28), (1e-2, 28)
    teach(paces, step, fast[0] * 1000)
    assert group(paces, chunks_of(5000), fast) > 1
    assert group(paces, chunks_of(5000), slow) == 1  # the items got slow: this map's first chunks show it
    for _ in range(20):
        teach(paces, step, slow[0] * 1000)
    assert group(paces, chunks_of(5000), fast) == 1  # still slow in the last maps: not yet


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


@pytest.fixture
def patient(monkeypatch):
    """A map waits for its first chunks however loaded the machine is: these tests are about the grouping."""
    monkeypatch.setattr(mapping, "PROBE_SECONDS", 60)


@pytest.fixture
def any_pace(monkeypatch):
    """A map is grouped however slow its first chunks were (a loaded machine can pause a task process for
    milliseconds): for tests about what a grouped map does, not about when it is grouped."""
    monkeypatch.setattr(mapping, "TASK_SECONDS", 60)


def test_a_map_whose_first_chunks_are_not_back_in_time_goes_a_chunk_a_task(lc, monkeypatch):
    def none_back(futures, timeout, return_when):  # (however fast they are: a busy machine can be slower)
        return set(), set(futures)

    monkeypatch.setattr(mapping, "wait", none_back)
    with lc.executor() as ex:
        for _ in range(2):  # (its earlier map's pace is not enough)
            out, tasks = tasks_run(ex, lambda: list(ex.map(square, range(20_000), chunksize=10)))
            assert out == [x * x for x in range(20_000)] and tasks == 2000


def test_a_map_is_grouped_by_the_pace_of_its_first_chunks(lc, patient):
    with lc.executor() as ex:
        for _ in range(2):
            out, tasks = tasks_run(ex, lambda: list(ex.map(square, range(20_000), chunksize=10)))
            assert out == [x * x for x in range(20_000)]
            assert PROBES + FEWEST_TASKS <= tasks <= 2000 / 2


def work(x: int, seconds: float) -> int:
    if seconds:
        import time

        time.sleep(seconds)
    return x


def test_items_that_got_slow_are_not_grouped_by_the_old_pace(lc, patient):
    with lc.executor() as ex:
        assert tasks_run(ex, lambda: list(ex.map(work, range(20_000), [0] * 20_000, chunksize=10)))[1] < 1000
        assert tasks_run(ex, lambda: list(ex.map(work, range(100), [0.01] * 100)))[1] == 100


def mark(x: int, path: str) -> int:
    if x == 10:
        raise Refused(f"refused {x}")
    if not path:
        return x
    time.sleep(0.0001)
    with open(path, "ab") as f:
        f.write(b".")
    return x


@pytest.mark.parametrize("stop", ["close", "raise"])
def test_a_grouped_map_stopped_early_stops_its_work(lc, patient, any_pace, tmp_path, stop):
    """What was sent ahead still runs (a task cannot be recalled once started), what was not is cancelled;
    even when the user keeps the exception (as a notebook keeps the last one), which keeps the map's frame."""
    path, n = str(tmp_path / "ran"), 20_000
    first = 11 if stop == "close" else 0  # (item 10 raises)
    with lc.executor() as ex:
        list(ex.map(mark, range(11, 1011), [""] * 1000))  # both leases up: the map starts at once
        before = ex.stats().done
        results = ex.map(mark, range(first, first + n), [path] * n)
        kept = None
        try:
            for x in results:
                if x == 20:
                    results.close()
                    break
        except Refused as exc:
            kept = exc
        assert (kept is not None) == (stop == "raise")
        ran_before = os.path.getsize(path)
        wait_until(lambda: ex.stats().queued == ex.stats().running == 0, what="the map's work to end")
        ran = os.path.getsize(path)
        assert ex.stats().done - before < ran / 2  # (it was grouped: tasks of several items)
    assert ran - ran_before < (n - ran_before) / 4  # all that was left, were it not cancelled


def nap(x: int) -> int:
    import time

    time.sleep(0.01)
    return x


def test_slow_items_keep_a_chunk_a_task(lc, patient):
    with lc.executor() as ex:
        for _ in range(2):
            assert tasks_run(ex, lambda: list(ex.map(nap, range(80))))[1] == 80


def test_a_failing_chunk_in_a_shared_task_raises_after_the_items_before_it(lc, patient, any_pace):
    with lc.executor() as ex:
        assert list(ex.map(fail_at_3333, range(3000), chunksize=5)) == list(range(3000))
        got = []
        with pytest.raises(Refused, match="refused 3333") as raised:
            for x in ex.map(fail_at_3333, range(5000), chunksize=5):
                got.append(x)
        assert got == list(range(3330))  # the chunks before the failing one, some of which shared its task
        assert isinstance(raised.value.__cause__, RemoteTraceback)
        assert ex.stats().done < 600 + 1000 / 4  # (600 tasks for the first map: the second was grouped)


def unpicklable_at_2513(x: int) -> object:
    return Unpicklable() if x == 2513 else x


def test_a_chunk_whose_results_cannot_be_pickled_fails_alone_in_a_shared_task(lc, patient, any_pace):
    with lc.executor() as ex:
        got = []
        with pytest.raises(TypeError, match="could not be pickled"):
            for x in ex.map(unpicklable_at_2513, range(5000), chunksize=5):
                got.append(x)
        assert got == list(range(2510))  # as a pool: the chunks before the failing one
        assert ex.stats().done < 1000 / 2  # (it was grouped)


def test_a_grouped_seeded_map_draws_what_one_chunk_a_task_draws(lc, patient, any_pace):
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
