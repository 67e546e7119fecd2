"""Module globals of the user's code last, per executor, in a task process, as in a ProcessPoolExecutor's
worker: ``initializer``/``initargs``, and the "load the model once per process" pattern."""

from __future__ import annotations

import enum
import os
from collections import Counter
from functools import partial

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from p2pexec.namespaces import Initialized, Namespace, sending_for
from p2pexec.prepare import plain_task
from p2pexec.tasks import PrepickledFunction, load_task

pytestmark = pytest.mark.timeout(120)

STATE = None
INITS = 0
MODEL = None
LIMIT = 10
MARK = None


def init(value):
    global STATE, INITS
    STATE = value
    INITS += 1


def get_state(_=None):
    return STATE, INITS, os.getpid()


def predict(x, run):
    global MODEL
    if MODEL is None:
        MODEL = {"w": 2}
        counted = f"P2PEXEC_TEST_LOADS_{run}"  # counted outside the module's globals, in the process
        os.environ[counted] = str(int(os.environ.get(counted, "0")) + 1)
    return x * MODEL["w"], os.environ[f"P2PEXEC_TEST_LOADS_{run}"], os.getpid()


def failing_init():
    raise OSError("no model file")


def mark(value):
    global MARK
    MARK = value
    return MARK


def read_mark():
    return MARK, LIMIT


def test_initializer_runs_once_per_task_process_and_its_globals_stay(cluster):
    with cluster.executor(initializer=init, initargs=(42,)) as ex:
        seen = [ex.submit(get_state).result(timeout=60) for _ in range(6)] + list(ex.map(get_state, range(20)))
    assert {(state, inits) for state, inits, _ in seen} == {(42, 1)}  # once in each process, not per task


def test_max_tasks_per_child_gives_each_task_process_that_many_tasks_then_a_fresh_one(cluster):
    """As in ProcessPoolExecutor: what a leaky library holds goes with its process, and each new process runs
    the initializer before its first task."""
    with cluster.executor(initializer=init, initargs=(7,), max_tasks_per_child=2) as ex:
        seen = [ex.submit(get_state).result(timeout=60) for _ in range(4)] + list(ex.map(get_state, range(8)))
    tasks_per_process = Counter(pid for _, _, pid in seen)
    assert max(tasks_per_process.values()) <= 2 and len(tasks_per_process) >= 6, tasks_per_process
    assert {(state, inits) for state, inits, _ in seen} == {(7, 1)}
    with cluster.executor() as ex:  # (and without it, processes last)
        assert len({ex.submit(get_state).result(timeout=60)[2] for _ in range(4)}) == 1
    with cluster.executor(max_tasks_per_child=True) as ex:  # an int to a pool (1); a worker takes only ints
        assert len({ex.submit(get_state).result(timeout=60)[2] for _ in range(2)}) == 2


@pytest.mark.parametrize("value, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_max_tasks_per_child_is_checked_as_process_pools_check_it(cluster, value, error):
    with pytest.raises(error, match="max_tasks_per_child"):
        cluster.executor(max_tasks_per_child=value)


def test_the_load_once_pattern_loads_once_per_task_process(executor):
    run = os.urandom(4).hex()
    results = [executor.submit(predict, i, run).result(timeout=60) for i in range(6)]
    results += executor.map(predict, range(6), [run] * 6)
    assert [r[0] for r in results] == [2 * i for i in range(6)] * 2
    assert {loads for _, loads, _ in results} == {"1"}  # each submit used to load it again


def init_big(data: bytes) -> None:
    global STATE
    STATE = len(data)


def test_big_initargs_cross_once_to_each_worker_not_with_every_task(cluster):
    """50 MB of initargs went with each of 20 tasks: 12 s, and a 200-item map 110 s (ProcessPool: 0.1 s)."""
    big = os.urandom(4 << 20)
    with cluster.executor(initializer=init_big, initargs=(big,)) as ex:
        seen = [ex.submit(get_state).result(timeout=60)[0] for _ in range(10)]
        seen += [r[0] for r in ex.map(get_state, range(20))]
        stats = ex.stats()
    assert set(seen) == {len(big)}
    assert 1 <= stats.values_sent <= 2 and stats.bytes_sent < 2.5 * len(big)  # (2 workers at most)


CACHE: dict = {}
FILLED: list = []


def fill() -> None:
    FILLED.extend([1, 2, 3])  # in place, no rebinding


def cached(x: int) -> tuple[bool, list]:
    hit = x in CACHE
    CACHE[x] = True
    return hit, list(FILLED)


def test_globals_changed_in_place_stay_while_the_client_sends_them_unchanged(cluster):
    """A cache the tasks fill, a list the initializer extends: the next task's copy replaced them."""
    with cluster.executor(initializer=fill, max_workers=1) as ex:
        got = [ex.submit(cached, 7).result(timeout=60) for _ in range(3)] + list(ex.map(cached, [7]))
    assert got == [(False, [1, 2, 3])] + [(True, [1, 2, 3])] * 3


class Colour(enum.Enum):
    RED = 1
    GREEN = 2


class Model:
    def predict(self, x: int) -> int:
        return 2 * x


TABLE: dict = {}
MADE = None


def init_table() -> None:
    global TABLE, MADE
    TABLE = {Colour.RED: "r", Colour.GREEN: "g"}
    MADE = Model()


def look_up(colour: Colour) -> tuple[str, bool, str]:
    return TABLE[colour], isinstance(MADE, Model), TABLE[Colour.GREEN]


def test_classes_of_the_users_code_stay_the_same_class_in_a_task_process(cluster):
    """Rebuilt for each task, an Enum member the initializer used as a key was not the next task's member,
    and an object it made was not an instance of the next task's class."""
    with cluster.executor(initializer=init_table) as ex:
        got = [ex.submit(look_up, Colour.RED).result(timeout=60) for _ in range(3)]
        got += ex.map(look_up, [Colour.GREEN])
    assert got == [("r", True, "g")] * 3 + [("g", True, "g")]


def test_a_failing_initializer_fails_each_task_with_its_error_and_others_run(cluster):
    with cluster.executor(initializer=failing_init) as ex:
        for _ in range(2):  # tried again by the next task
            with pytest.raises(OSError, match="no model file"):
                ex.submit(abs, -1).result(timeout=60)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        cluster.executor(initializer=42)


def test_executors_do_not_share_globals_and_the_clients_changes_arrive(cluster, monkeypatch):
    with cluster.executor(max_workers=1) as first, cluster.executor(max_workers=1) as second:
        assert first.submit(mark, "first").result(timeout=60) == "first"
        assert first.submit(read_mark).result(timeout=60) == ("first", 10)  # kept for its later tasks
        assert second.submit(read_mark).result(timeout=60) == (None, 10)  # not another executor's
        monkeypatch.setattr(f"{__name__}.LIMIT", 11)
        assert first.submit(read_mark).result(timeout=60) == ("first", 11)  # the client's new value arrives


def test_a_task_with_an_initializer_keeps_the_fast_path_and_runs_it_once_per_executor():
    """A wrapper per submit would otherwise send every task through dill's pure-Python pickler (10x dearer)."""
    with sending_for("executor-a"):
        initializer = PrepickledFunction(partial(init, 7))
        payload = plain_task(Initialized(get_state, initializer, "executor-a"), (1,), {})
    assert payload is not None
    for _ in range(2):
        fn, args, kwargs = load_task(b"".join(bytes(p) for p in payload))
        assert fn(*args, **kwargs)[:2] == (7, 1)  # here, in this process, as in a task process


# -- the policy, on its own -----------------------------------------------------------------------------
@given(st.lists(st.tuples(st.sampled_from(["client", "rebind", "mutate"]), st.sampled_from("ab"), st.integers(0, 2)),
                max_size=30))
@example([("client", "a", 0), ("mutate", "a", 0), ("client", "a", 0), ("client", "a", 1)])
def test_the_workers_changes_survive_until_the_client_changes_that_global(steps):
    """A name code here rebound stays; a value changed in place stays while the client sends what it sent
    before; otherwise the client's value arrives."""
    space, model, rebound, sent = Namespace("__main__"), {}, set(), {}
    for who, key, number in steps:
        if who == "client":  # the unpickler filling it with a function's globals: a new copy each time
            space[key] = [number]
            if key not in model or (key not in rebound and sent[key] != number):
                model[key], sent[key] = [number], number
        elif who == "rebind":  # code here: STORE_GLOBAL
            dict.__setitem__(space, key, ("rebound", number))
            model[key] = ("rebound", number)
            rebound.add(key)
        elif key in model and key not in rebound:  # code here: CACHE[k] = v, DATA.append(v)
            dict.get(space, key).append("x")
            model[key].append("x")
    assert {k: v for k, v in space.items() if k != "__name__"} == model
