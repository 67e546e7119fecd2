"""Reproducible random numbers: a seeded run gives the same numbers whatever the workers, slots, chunksize,
completion order and retries; unseeded tasks never share random state, not even after a seeded one."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pexec import LocalCluster, task_rng, task_seed
from p2pexec.chunks import numbered_chunks
from p2pexec.seeding import Seeded, python_seed, seeded_chunk

np = pytest.importorskip("numpy")
pytestmark = pytest.mark.timeout(180)


def draw(i: int) -> tuple:
    import random

    import numpy

    import p2pexec

    first = p2pexec.task_rng().random()
    return (i, random.random(), float(numpy.random.random()), float(first), float(p2pexec.task_rng().random()),
            p2pexec.task_seed().spawn_key)


def draw_when_let(port: int, i: int) -> tuple:
    """``draw``, once the test lets it: says on which worker it started, then waits (until the gate closes)."""
    import os
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
            conn.sendall(f"{os.getppid()}\n".encode())  # (unsandboxed local workers: our parent is the daemon)
            conn.recv(1)
    except OSError:
        pass  # the gate is closed: the victim is dead, run at once
    return draw(i)


def _worker_of(conn: socket.socket) -> int:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(16)
        if not chunk:
            return -1
        data += chunk
    return int(data)


def run(workers: int, slots: int, seed: int, chunksize: int, n: int = 40, kill_one: bool = False) -> list:
    with LocalCluster(workers=workers, slots=slots) as lc, lc.executor(seed=seed) as ex:
        singles = [ex.submit(draw, -1).result(timeout=60), ex.submit(draw, -2).result(timeout=60)]
        if not kill_one:
            return singles + list(ex.map(draw, range(n), chunksize=chunksize))
        with socket.create_server(("127.0.0.1", 0)) as gate:
            gate.settimeout(60)
            results = ex.map(partial(draw_when_let, gate.getsockname()[1]), range(n), chunksize=chunksize)
            held, victim = [], lc.workers[0]
            while True:  # every task waits at its start until one has started on the victim
                conn, _ = gate.accept()
                conn.settimeout(60)
                held.append(conn)
                if _worker_of(conn) == victim.pid:
                    break
            victim.kill()  # SIGKILL, a task of it running: that task runs again elsewhere
        for conn in held:  # (the gate is closed first: later tasks do not wait)
            with conn, contextlib.suppress(OSError):  # (the victim's end may be gone)
                conn.sendall(b"g")
        return singles + list(results)


def test_a_seeded_run_is_the_same_whatever_runs_it():
    reference = run(1, 3, seed=7, chunksize=1)
    assert len({r[1] for r in reference}) == len(reference)  # every task its own stream
    assert all(r[3] != r[4] for r in reference)  # task_rng() continues its stream within a task
    assert run(3, 1, seed=7, chunksize=7) == reference
    assert run(3, 1, seed=7, chunksize=3, kill_one=True) == reference
    assert run(1, 1, seed=8, chunksize=1) != reference


def probe(_: object = None) -> tuple:
    import os
    import random

    import numpy

    import p2pexec

    try:
        p2pexec.task_seed()
        seeded = True
    except RuntimeError:
        seeded = False
    return os.getpid(), random.random(), float(numpy.random.random()), seeded


def test_an_unseeded_task_after_a_seeded_one_in_the_same_process_draws_afresh():
    """Two members both using seed=42 must not leave identical random state for whatever runs next."""
    with LocalCluster(workers=1, slots=1) as lc, lc.executor() as plain:
        pids, after = set(), []
        for _ in range(2):
            with lc.executor(seed=42) as seeded:
                pids.add(seeded.submit(probe).result(timeout=60)[0])
            pid, *draws, seeded_there = plain.submit(probe).result(timeout=60)
            pids.add(pid)
            assert not seeded_there  # task_seed() raises outside a seeded task
            after.append(draws)
    assert len(pids) == 1  # one task process served all four
    assert after[0][0] != after[1][0] and after[0][1] != after[1][1]


def draw_unseeded(i: int) -> tuple:
    import random

    import numpy

    return i, random.random(), float(numpy.random.random())


def test_unseeded_tasks_do_not_share_random_state(executor):
    draws = list(executor.map(draw_unseeded, range(20)))
    assert len({d[1] for d in draws}) == 20 and len({d[2] for d in draws}) == 20


def test_seed_true_picks_a_seed_logs_it_and_it_reproduces_the_run(cluster, caplog):
    caplog.set_level(logging.INFO, logger="p2pexec.client")
    with cluster.executor(seed=True) as ex:
        assert isinstance(ex.seed, int)
        first = list(ex.map(draw, range(4)))
    assert any(f"seed={ex.seed}" in r.getMessage() for r in caplog.records)
    with cluster.executor(seed=ex.seed) as again:
        assert list(again.map(draw, range(4))) == first


# -- the pure path: what runs in the task process, run here ----------------------------------------------------
def test_task_rng_is_one_generator_per_task_on_the_documented_stream():
    def inside() -> tuple:
        rng = task_rng()
        assert task_rng() is rng
        return task_seed(), rng.random(2), task_rng().random()

    seed_sequence, two, third = Seeded(inside, 7, (0, 3))()
    assert (seed_sequence.entropy, seed_sequence.spawn_key) == (7, (0, 3))
    expected = np.random.Generator(np.random.PCG64(np.random.SeedSequence(7, spawn_key=(0, 3)))).random(3)
    assert list(two) + [third] == list(expected)
    with pytest.raises(RuntimeError, match="seed="):
        task_seed()
    with pytest.raises(RuntimeError):
        task_rng()


def test_a_seeded_task_leaves_fresh_random_state_behind():
    """Run the same seeded task twice: what follows must not be the same continuation of its stream."""
    after = []
    for _ in range(2):
        Seeded(draw, 42, (0, 0))(0)
        after.append((random.random(), float(np.random.random())))
        seeded_chunk(draw, 42, (1, 0), (0, ((0,), (1,))))
        after.append((random.random(), float(np.random.random())))
    assert len({a[0] for a in after}) == 4 and len({a[1] for a in after}) == 4


def test_a_failing_seeded_task_leaves_no_stream_behind():
    def fails() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        Seeded(fails, 1, (0, 0))()
    with pytest.raises(RuntimeError):
        task_seed()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**64), st.integers(1, 30), st.integers(1, 12))
def test_map_results_do_not_depend_on_chunksize(seed, n, chunksize):
    def mapped(size: int) -> list:
        return [r for chunk in numbered_chunks(range(n), chunksize=size) for r in seeded_chunk(draw, seed, (1, 5), chunk)]

    one_by_one = mapped(1)
    assert mapped(chunksize) == one_by_one
    assert one_by_one[-1] == Seeded(draw, seed, (1, 5, n - 1))(n - 1)  # an item: a submit with its key
    assert [r[5] for r in one_by_one] == [(1, 5, i) for i in range(n)]


@settings(max_examples=200)
@given(st.integers(0, 2**64), st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
       st.lists(st.integers(0, 10**6), min_size=1, max_size=3))
def test_distinct_keys_or_seeds_give_distinct_python_seeds(seed, a, b):
    if a != b:
        assert python_seed(seed, tuple(a)) != python_seed(seed, tuple(b))
    assert python_seed(seed, tuple(a)) != python_seed(seed + 1, tuple(a))
    assert python_seed(seed, tuple(a)) == python_seed(seed, tuple(a))
