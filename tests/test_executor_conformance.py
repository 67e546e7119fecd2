"""P2PExecutor behaves like the stdlib executors (after CPython's test_concurrent_futures).

Everything runs through the real path: SSH board, two worker daemons,
libp2p (Noise, yamux), sealed channels, task processes.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from concurrent import futures

import pytest

from p2pexec import RemoteTraceback, TaskProcessDiedError

pytestmark = pytest.mark.timeout(60)


def mul(x, y):
    return x * y


def sleep_and_return(seconds, value):
    time.sleep(seconds)
    return value


def raise_value_error(message):
    raise ValueError(message)


def worker_pid(_=None):
    return os.getppid()  # the worker daemon: task processes are its children


def test_submit(executor):
    assert executor.submit(pow, 2, 8).result() == 256


def test_submit_keyword_and_positional_only_fn_argument(executor):
    assert executor.submit(mul, 2, y=5).result() == 10
    assert executor.submit(dict, fn=1).result() == {"fn": 1}


def test_map_several_iterables_stops_at_shortest(executor):
    assert list(executor.map(pow, range(10), [2] * 7)) == [pow(i, 2) for i in range(7)]


@pytest.mark.parametrize("chunksize", [1, 2, 3, 7, 50])
def test_map_chunksize_keeps_order(executor, chunksize):
    assert list(executor.map(mul, range(23), range(23), chunksize=chunksize)) == [i * i for i in range(23)]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, x: int) -> list[int]:
        self.seen.append(x)
        return list(self.seen)


def test_map_of_a_stateful_callable_starts_each_chunk_from_the_clients_state(executor):
    """As ProcessPoolExecutor pickles the callable with each chunk: no chunk sees another's changes, and a
    second map does not inherit the first's (a task process used to keep one copy for all of them)."""
    recorder = Recorder()
    for _ in range(2):
        assert list(executor.map(recorder.add, range(6))) == [[i] for i in range(6)]
        assert list(executor.map(recorder.add, range(6), chunksize=3)) == [[0], [0, 1], [0, 1, 2],
                                                                            [3], [3, 4], [3, 4, 5]]
    assert recorder.seen == []


def test_map_rejects_bad_chunksize(executor):
    with pytest.raises(ValueError):
        executor.map(int, [], chunksize=0)


def test_map_timeout(executor):
    results = []
    with pytest.raises(futures.TimeoutError):
        for r in executor.map(sleep_and_return, [0, 0, 4], ["a", "b", "c"], timeout=1.5):
            results.append(r)
    assert results == ["a", "b"]


def test_map_reraises_the_task_exception(executor):
    it = executor.map(raise_value_error, ["boom"])
    with pytest.raises(ValueError, match="boom"):
        next(it)


def test_exception_keeps_type_and_remote_traceback(executor):
    future = executor.submit(raise_value_error, "bad input")
    exc = future.exception()
    assert type(exc) is ValueError and str(exc) == "bad input"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_value_error" in exc.__cause__.tb and "ValueError: bad input" in exc.__cause__.tb


def test_unpicklable_exception_becomes_remote_error(executor):
    def raise_unpicklable():
        import threading

        class Bad(Exception):
            def __init__(self):
                super().__init__("held a lock")
                self.lock = threading.Lock()

        raise Bad()

    exc = executor.submit(raise_unpicklable).exception()
    assert "held a lock" in str(exc)


def test_unpicklable_argument_fails_its_future_only(executor):
    future = executor.submit(list, (i for i in range(3)))  # generators cannot be pickled
    assert isinstance(future.exception(), TypeError)
    assert executor.submit(int, "5").result() == 5


def _touch(path, resource):
    with open(path, "w") as out:
        out.write(repr(resource))


@pytest.mark.parametrize("resource", ["lock", "rlock", "file"])
def test_locks_and_open_files_are_refused_before_the_task_runs(executor, tmp_path, resource):
    """As ProcessPoolExecutor does: dill would send a fresh lock, or reopen the file by its path on the
    friend's machine, and run the task with it."""
    with open(tmp_path / "data.txt", "w") as opened:
        value = {"lock": threading.Lock(), "rlock": threading.RLock(), "file": opened}[resource]
        marker = tmp_path / "ran"
        error = executor.submit(_touch, marker, [value]).exception(timeout=60)
        assert isinstance(error, TypeError) and "cannot pickle" in str(error) and "open it in the task" in str(error)
        with pytest.raises(TypeError, match="cannot pickle"):
            list(executor.map(_touch, [marker], [value]))
        with pytest.raises(TypeError, match="could not be pickled.*cannot pickle"):
            executor.submit(threading.Lock).result(timeout=60)
    assert not marker.exists()


def test_a_default_argument_naming_a_standard_stream_still_travels(executor):
    def say(text, file=sys.__stderr__):  # (sys.stderr is pytest's capture here)
        return file is sys.__stderr__

    assert executor.submit(say, "hello").result(timeout=60) is True


def test_lambdas_closures_and_nested_functions(executor):
    factor = 3

    def outer(n):
        def inner(k):
            return k * factor

        return sum(inner(i) for i in range(n))

    assert executor.submit(lambda: factor + 1).result() == 4
    assert executor.submit(outer, 4).result() == 18


def test_stdout_and_stderr_replayed_on_client(executor, capsys):
    def chatty():
        import os
        import sys

        print("hello from the worker")
        print("to stderr", file=sys.stderr)
        os.write(1, b"fd-level output\n")
        return 7

    assert executor.submit(chatty).result() == 7
    out, err = capsys.readouterr()
    assert "hello from the worker" in out and "fd-level output" in out
    assert "to stderr" in err


def test_as_completed_yields_every_future(executor):
    fs = [executor.submit(sleep_and_return, 0.3 * (i % 2), i) for i in range(6)]
    assert sorted(f.result() for f in futures.as_completed(fs, timeout=30)) == list(range(6))


def test_wait_first_completed_and_all_completed(executor):
    slow = executor.submit(sleep_and_return, 3, "slow")
    fast = executor.submit(sleep_and_return, 0, "fast")
    done, not_done = futures.wait([slow, fast], return_when=futures.FIRST_COMPLETED, timeout=30)
    assert fast in done and slow in not_done
    done, not_done = futures.wait([slow, fast], return_when=futures.ALL_COMPLETED, timeout=30)
    assert not not_done


def test_wait_first_exception(executor):
    bad = executor.submit(raise_value_error, "x")
    slow = executor.submit(sleep_and_return, 2, 1)
    done, _ = futures.wait([bad, slow], return_when=futures.FIRST_EXCEPTION, timeout=30)
    assert bad in done


def test_run_in_executor(executor):
    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(executor, mul, i, 2) for i in range(5)))

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]


def test_both_workers_are_used(executor):
    pids = set(executor.map(sleep_and_return, [0.5] * 4, [None] * 4))  # warm-up leases both workers
    pids = {f.result() for f in [executor.submit(_pid_after, 0.5) for _ in range(4)]}
    assert len(pids) == 2


def _pid_after(seconds):
    time.sleep(seconds)
    return os.getppid()


def test_max_workers_caps_the_slots_leased(cluster):
    with cluster.executor(max_workers=1) as ex:
        pids = {f.result() for f in [ex.submit(_pid_after, 0.2) for _ in range(4)]}
    assert len(pids) == 1


def _interval(seconds):
    started = time.time()
    time.sleep(seconds)
    return started, time.time()


def test_max_workers_holds_against_a_multi_slot_worker():
    from p2pexec import LocalCluster

    with LocalCluster(workers=1, slots=2) as lc:
        with lc.executor(max_workers=1) as ex:
            intervals = sorted(ex.map(_interval, [0.2] * 4))
        with lc.executor() as ex:
            both = sorted(ex.map(_interval, [0.5] * 2))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(intervals, intervals[1:]))
    assert both[1][0] < both[0][1]  # without the cap, the two slots do overlap


def test_cancel_pending_future(cluster):
    with cluster.executor(max_workers=1) as ex:
        running = ex.submit(sleep_and_return, 1, "done")
        queued = ex.submit(sleep_and_return, 0, "never")
        assert queued.cancel()
        assert running.result() == "done"
        assert queued.cancelled()


def test_submit_after_shutdown_raises(cluster):
    ex = cluster.executor()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(int)
    ex.shutdown()  # idempotent


def test_shutdown_wait_true_completes_every_future(cluster):
    ex = cluster.executor()
    fs = [ex.submit(sleep_and_return, 0.2, i) for i in range(5)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in fs] == list(range(5))


def test_shutdown_ends_the_loop_as_its_leases_end_not_at_its_next_tick(cluster, monkeypatch):
    """The loop's tick (every 0.25 s) was what noticed a shutdown: every script waited for it at its end."""
    from p2pexec import scheduler

    monkeypatch.setattr(scheduler, "TICK", 3600)
    ex = cluster.executor()
    assert ex.submit(mul, 6, 7).result(timeout=30) == 42
    ex.shutdown(wait=True)
    assert not ex._runtime.alive  # (shutdown waits up to 10 s for the loop, then gives up on it)


def test_shutdown_wait_false_returns_at_once_and_futures_finish(cluster):
    ex = cluster.executor()
    future = ex.submit(sleep_and_return, 1, "late")
    started = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - started < 0.9
    assert future.result(timeout=30) == "late"


def test_shutdown_cancel_futures(cluster):
    ex = cluster.executor(max_workers=1)
    first = ex.submit(sleep_and_return, 1, "first")
    rest = [ex.submit(sleep_and_return, 1, i) for i in range(5)]
    while not first.running():
        futures.wait([first], timeout=0.05)
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result() == "first"
    assert all(f.cancelled() for f in rest)  # none had started: withdrawn wherever they waited


def test_task_killing_its_process_fails_that_task_and_worker_survives(executor):
    exit_future = executor.submit(os._exit, 3)
    with pytest.raises(TaskProcessDiedError, match="exited with status 3"):
        exit_future.result()
    segv = executor.submit(lambda: os.kill(os.getpid(), 11))
    with pytest.raises(TaskProcessDiedError, match="SIGSEGV"):
        segv.result()
    assert list(executor.map(mul, range(6), range(6))) == [i * i for i in range(6)]


def _print_and_crash() -> None:
    import ctypes

    print("loading the model")  # a line: it reaches the worker at once, as a terminal shows it
    print("partial", end="", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    os.write(1, b" and from C\n")
    ctypes.string_at(0)  # a segfault in native code


def test_what_a_task_printed_before_its_process_died_is_shown_here(executor, capsys):
    """Output is lost exactly when it is needed most (a crash, an out-of-memory kill) if it comes only with
    the outcome."""
    capsys.readouterr()
    with pytest.raises(TaskProcessDiedError, match="SIGSEGV"):
        executor.submit(_print_and_crash).result(timeout=60)
    out, err = capsys.readouterr()
    assert out == "loading the model\npartial and from C\n" and err == "to stderr\n"
    assert executor.submit(mul, 2, 3).result(timeout=60) == 6  # and a later task prints nothing of it
    assert capsys.readouterr() == ("", "")


def _cut_the_hop_and_stay() -> None:
    import os
    import threading
    import time

    threading.Thread(target=time.sleep, args=(3600,)).start()  # a thread the interpreter would wait for
    os.closerange(0, 4096)  # the hop with it: the worker hears EOF


def test_a_task_process_that_cuts_its_link_and_stays_is_killed_and_says_so(executor):
    """The error says the worker killed it (not "killed by SIGKILL", which reads as the OOM killer)."""
    with pytest.raises(TaskProcessDiedError, match="closed its link to the worker but did not exit"):
        executor.submit(_cut_the_hop_and_stay).result(timeout=60)
    assert executor.submit(mul, 6, 7).result(timeout=30) == 42


def test_system_exit_in_task_is_its_exception(executor):
    with pytest.raises(SystemExit):
        executor.submit(sys.exit, 4).result()
