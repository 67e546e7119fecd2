"""Resource requests end to end: real workers that lend different memory, GPUs and tags."""

from __future__ import annotations

import logging
import os
import time

import pytest

from p2pexec import LocalCluster, NoWorkersError, P2PExecutor, TaskProcessDiedError, current_worker


@pytest.fixture(scope="module")
def lab():
    """A big worker (2 slots, 2 GiB lent, tag big, GPUs 0 and 1) and a plain one (1 slot, nothing asked)."""
    with LocalCluster(workers=0) as lc:
        lc.add_worker(slots=2, options=("--memory", "2GiB", "--tag", "big", "--gpus", "0,1"))
        lc.add_worker(slots=1)
        yield lc


@pytest.fixture(scope="module")
def ex(lab):
    with lab.executor() as executor:
        yield executor


def where(_: object = None) -> tuple[str, frozenset[str], int, str | None, int]:
    info = current_worker()
    assert info is not None
    return info.worker, info.resources.tags, info.slot, os.environ.get("CUDA_VISIBLE_DEVICES"), len(info.gpus)


def allocate(size: int) -> int:
    return len(bytearray(size))


def busy_interval(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)  # the task's work: it must hold its slot for a while
    return start, time.time()


def test_tasks_asking_for_a_tag_run_only_where_it_is(ex):
    ran = list(ex.options(tags={"big"}).map(where, range(12)))
    assert {tags for _, tags, *_ in ran} == {frozenset({"big"})}
    assert len({worker for worker, *_ in ran}) == 1


def test_resources_on_the_executor_apply_to_every_task(lab):
    with lab.executor(resources={"tags": ["big"]}) as tagged:
        assert {tags for _, tags, *_ in tagged.map(where, range(6))} == {frozenset({"big"})}
        assert tagged.submit(where).result()[1] == frozenset({"big"})


def test_a_task_asking_for_a_gpu_sees_exactly_its_slots_one(ex):
    ran = list(ex.options(gpus=1).map(where, range(8)))
    assert {(slot, cuda, seen) for _, _, slot, cuda, seen in ran} <= {(0, "0", 1), (1, "1", 1)}


def test_current_worker_is_none_outside_a_task_and_names_the_worker_inside(ex, lab):
    assert current_worker() is None
    info = ex.options(tags={"big"}).submit(current_worker).result()
    assert info.member == lab.worker_user
    assert (info.resources.slots, info.resources.memory, info.resources.tags) == (2, 2 << 30, frozenset({"big"}))
    assert [g.index for g in info.resources.gpus] == [0, 1] and info.resources.python.count(".") == 2


def test_a_task_past_its_memory_request_is_stopped_and_the_worker_carries_on(ex):
    big = ex.options(memory="512MiB", tags={"big"})
    with pytest.raises(TaskProcessDiedError, match="past its memory limit of 512 MiB"):
        big.submit(allocate, 1 << 30).result(timeout=60)
    assert big.submit(allocate, 64 << 20).result(timeout=60) == 64 << 20


def chatter(megabytes: int) -> int:
    import subprocess
    import sys

    line = "x" * ((1 << 20) - 1)
    for i in range(megabytes):
        print(f"{i:06d}{line[6:]}")  # a progress log, 1 MiB a line
    subprocess.run([sys.executable, "-c", f"import os\nfor _ in range({megabytes}): os.write(1, b'y' * (1 << 20))"],
                   check=True)  # and as much from a subprocess, at the fd
    return megabytes


def test_what_a_task_prints_does_not_count_against_its_memory_and_comes_back_trimmed(ex, capsys):
    """600 MiB printed by a task limited to 512 MiB: it was killed (status 1) after doing all its work."""
    capsys.readouterr()
    assert ex.options(memory="512MiB", tags={"big"}).submit(chatter, 300).result(timeout=120) == 300
    out = capsys.readouterr().out
    assert len(out) < 6 << 20 and out.count("dropped here") == 2  # a start and an end of each
    start, middle, end = out.split("dropped here")  # in the order it was written: its start went to the fd
    assert start.startswith("000000x") and "y" * 1000 in middle and "000299x" in end


def test_a_task_that_asked_for_nothing_is_held_to_its_slots_share(ex):
    with pytest.raises(TaskProcessDiedError, match="past its memory limit of 1 GiB"):
        ex.options(tags={"big"}).submit(allocate, 3 << 29).result(timeout=60)


def test_a_worker_never_runs_more_requested_memory_than_it_lends(ex):
    """2 GiB lent, 1.5 GiB asked per task: the two slots never run two of them at once."""
    runs = sorted(ex.options(memory="1536MiB", tags={"big"}).map(busy_interval, [0.3] * 4))
    assert all(earlier[1] <= later[0] for earlier, later in zip(runs, runs[1:])), runs


def test_a_need_no_worker_can_meet_fails_saying_what_the_workers_lend(lab, caplog):
    caplog.set_level(logging.WARNING, logger="p2pexec.client")
    with lab.executor(worker_timeout=6, warn_after=1) as strict:
        future = strict.options(memory="64TiB").submit(pow, 2, 2)
        with pytest.raises(NoWorkersError, match=r"cannot meet memory=64 TiB: .*it lends 2 GiB in all.*tags \{big\}"):
            future.result(timeout=60)
        assert strict.submit(pow, 2, 3).result(timeout=60) == 8  # other needs are served meanwhile
    assert any("tasks asking for memory=64 TiB" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad, error", [({"memory": "lots"}, ValueError), ({"gpus": -1}, ValueError),
                                        ({"cores": 0}, ValueError), ({"tags": "big"}, TypeError),
                                        ({"tags": {"no spaces"}}, ValueError)])
def test_bad_requests_fail_at_the_call(ex, bad, error):
    with pytest.raises(error):
        ex.options(**bad)


def test_an_unknown_resource_fails_when_the_executor_is_made(lab):
    with pytest.raises(TypeError, match="unknown resource 'disk'"):
        P2PExecutor(lab.cluster, board=lab.board, identity=lab.identity, members=lab.members,
                    known_hosts=lab.known_hosts, resources={"disk": "1TiB"})


def test_a_views_shutdown_waits_for_its_own_tasks_and_leaves_the_executor_open(ex):
    with ex.options(tags={"big"}) as view:
        futures = [view.submit(busy_interval, 0.2) for _ in range(3)]
    assert all(f.done() for f in futures)
    assert ex.submit(pow, 3, 2).result(timeout=60) == 9
