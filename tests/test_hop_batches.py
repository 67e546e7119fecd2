"""Several tasks handed to one task process at once (the worker's batches of short tasks), through a real
task process: they run in order, a task not started yet is skipped at once while another runs, a crash
ends only the task that crashed."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from p2pexec.prepare import prepare_task
from p2pexec.tasks import load_outcome
from p2pexec.worker.slots import TaskProcessDied, TaskSlot

pytestmark = pytest.mark.timeout(60)


def hold(port: int) -> str:
    """Tell the test we run (a connection), then wait until released."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(30)
        return conn.recv(1).decode()


def mark(path: str) -> int:
    with open(path, "w") as f:
        f.write("ran")
    return os.getpid()


def die() -> None:
    os._exit(7)


def task(fn, *args):
    payload, values, _ = prepare_task(fn, args, {})
    assert not values
    return memoryview(b"".join(bytes(p) for p in payload)), None, []


def result(outcome) -> object:
    return load_outcome(outcome).value


async def accept(listener: socket.socket) -> socket.socket:
    conn, _ = await trio.to_thread.run_sync(listener.accept)
    return conn


def test_a_task_not_started_is_skipped_at_once_while_the_one_before_it_runs(tmp_path):
    skipped: list[int] = []

    async def main() -> None:
        heard = trio.Event()
        slot = TaskSlot(0)
        slot.on_skipped = lambda number: (skipped.append(number), heard.set())
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(30)
            try:
                numbers = await slot.submit([task(hold, listener.getsockname()[1]),
                                             task(mark, str(tmp_path / "a")), task(mark, str(tmp_path / "b"))])
                running = await accept(listener)  # the first task runs, the two others wait behind it
                await slot.skip(numbers[2])
                with running, trio.fail_after(30):
                    got = []

                    async def first() -> None:
                        got.append(await slot.outcome())

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(first)  # reading outcomes is how the skip's notice is heard
                        await heard.wait()
                        assert not got  # heard while the first task still ran
                        running.sendall(b"y")
                assert result(got[0]) == "y"
                second = result(await slot.outcome())  # the second one ran, in the task process
                assert isinstance(second, int) and second != os.getpid()
                assert await slot.outcome() is None  # the third was skipped: nothing more comes
                assert (tmp_path / "a").exists() and not (tmp_path / "b").exists()
            finally:
                await slot.stop()

    trio.run(main)
    assert skipped == [2]


def test_a_task_that_started_is_not_skipped(tmp_path):
    async def main() -> None:
        slot = TaskSlot(0)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(30)
            try:
                numbers = await slot.submit([task(hold, listener.getsockname()[1])])
                running = await accept(listener)
                await slot.skip(numbers[0])  # too late: it runs, and answers as usual
                with running:
                    running.sendall(b"z")
                    with trio.fail_after(30):
                        assert result(await slot.outcome()) == "z"
            finally:
                await slot.stop()

    trio.run(main)


def test_a_crash_ends_the_task_that_crashed_and_the_next_process_runs_the_rest(tmp_path):
    async def main() -> None:
        slot = TaskSlot(0)
        try:
            await slot.submit([task(mark, str(tmp_path / "a")), task(die), task(mark, str(tmp_path / "c"))])
            with trio.fail_after(30):
                first = result(await slot.outcome())
                with pytest.raises(TaskProcessDied, match="exited with status 7"):
                    await slot.outcome()
                assert not (tmp_path / "c").exists()  # it was behind the crash, in the process that ended
                await slot.submit([task(mark, str(tmp_path / "c"))])
                assert result(await slot.outcome()) != first  # a fresh process
            assert (tmp_path / "c").exists()
        finally:
            await slot.stop()

    trio.run(main)


def test_the_answers_of_a_batch_leave_while_a_long_task_after_them_runs():
    """A batch's answers are held a moment to leave together, never until the long task behind them ends."""
    import time
    from concurrent.futures import wait

    from p2pexec import LocalCluster

    with LocalCluster(workers=1, slots=1) as lc, lc.executor() as ex:
        for _ in range(50):  # short tasks: the lease's tasks go to the task process in batches now
            ex.submit(int).result()
        short = [ex.submit(int, i) for i in range(40)]
        long = ex.submit(time.sleep, 4)
        done, not_done = wait(short, timeout=2)
        assert not not_done, f"{len(not_done)} short answers waited for the long task behind them"
        assert [f.result() for f in short] == list(range(40))
        ex.interrupt(long)  # (it would hold the shutdown 4 s)


def test_a_slot_ending_outside_a_worker_leaves_the_processes_other_code_started_alone():
    """A slot's leftovers are swept only in a worker daemon (a child subreaper): a test driving a slot
    in-process swept this pytest process's other children, the session's LocalCluster workers among them."""
    import subprocess

    bystander = subprocess.Popen(["sleep", "60"])

    async def main() -> None:
        slot = TaskSlot(0)
        assert result(await _one(slot, mark, os.devnull)) > 0
        await slot.stop()

    try:
        trio.run(main)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def _one(slot: TaskSlot, fn, *args):
    await slot.submit([task(fn, *args)])
    with trio.fail_after(30):
        return await slot.outcome()


def test_a_stop_meant_for_a_task_that_answered_meanwhile_does_not_cancel_the_next():
    """An interrupt of a queued task stops the attempt once it is the head; if it was answered (skipped)
    before the stop took effect, the next head was never asked to stop: it runs again, not CANCELLED."""
    from p2pexec.worker.lease_server import _Batch

    batch = _Batch(None, [(task_id, memoryview(b""), None, []) for task_id in (1, 2, 3)])  # type: ignore[arg-type]
    batch.interrupted.add(2)
    batch.answered(1, [])
    assert batch.stopped() == 2  # the interrupted task is the head: it answers CANCELLED
    batch.answered(2, [])  # its skip's notice came first
    assert batch.stopped() is None  # 3 runs again
    batch.answered(3, [])
    assert batch.stopped() is None


def test_a_retirement_its_lease_cuts_short_still_sees_the_process_end(tmp_path):
    async def main() -> None:
        slot = TaskSlot(0)
        try:
            await slot.submit([task(mark, str(tmp_path / "a"))])
            with trio.fail_after(30):
                pid = result(await slot.outcome())
            with trio.CancelScope() as lease:
                lease.cancel()  # the lease ended as its last batch retired the process (max_tasks_per_child)
                await slot.retire()
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # ended and reaped, not left running or a zombie
        finally:
            await slot.stop()

    trio.run(main)
