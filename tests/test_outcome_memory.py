"""A task process writes a big outcome into the memory of its last one, and only once the daemon has let
that one go: an outcome the daemon still sends from is never written over."""

from __future__ import annotations

import gc
import os
import socket
import threading

import pytest
import trio

from p2pexec.prepare import prepare_task
from p2pexec.tasks import load_outcome
from p2pexec.worker import hop, taskproc
from p2pexec.worker.slots import TaskSlot

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(not hop.shared(), reason="no memfd here")]
MIB = 1 << 20


def big(letter: str) -> bytes:
    return letter.encode() * (2 * MIB)


def task(fn, *args):
    payload, values, _ = prepare_task(fn, args, {})
    assert not values
    return memoryview(b"".join(bytes(p) for p in payload)), None, []


def outcome_files(pid: int) -> set[int]:
    """The inodes of the outcome memfds a task process holds open."""
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "p2pexec-outcome" in os.readlink(f"/proc/{pid}/fd/{name}"):
                found.add(os.stat(f"/proc/{pid}/fd/{name}").st_ino)
        except FileNotFoundError:
            pass
    return found


def test_an_outcome_the_daemon_holds_is_never_written_over_and_one_let_go_is_written_again():
    async def main() -> None:
        slot = TaskSlot(0)
        try:
            await slot.submit([task(big, "a")])
            first = await slot.outcome()
            pid = slot._proc.pid
            (a,) = outcome_files(pid)
            await slot.submit([task(big, "b")])  # the first is still held: the second needs memory of its own
            second = await slot.outcome()
            (b,) = outcome_files(pid)
            assert b != a
            assert load_outcome(first).value == big("a") and load_outcome(second).value == big("b")
            del first, second
            gc.collect()
            await slot.submit([task(big, "c")])  # both let go: the last one's memory is written again
            third = await slot.outcome()
            assert outcome_files(pid) == {b}
            assert load_outcome(third).value == big("c")
        finally:
            await slot.stop()

    trio.run(main)


def small() -> int:
    return 1


def test_outcomes_are_numbered_alike_on_both_sides_through_small_outcomes_and_a_new_process():
    """Only shared outcomes are numbered, and a new process numbers afresh: an outcome of the process
    before, let go of later, must not free one of the new process's."""
    async def main() -> None:
        slot = TaskSlot(0)
        try:
            await slot.submit([task(big, "a"), task(small), task(big, "b")])
            a, one, b = [await slot.outcome() for _ in range(3)]
            assert load_outcome(one).value == 1
            del a, one
            gc.collect()  # shared outcome 0 let go, 1 (b) held
            await slot.submit([task(big, "c")])
            c = await slot.outcome()
            assert load_outcome(b).value == big("b") and load_outcome(c).value == big("c")
            await slot.stop()
            await slot.submit([task(big, "d")])  # a new process: d is its outcome 0, held
            d = await slot.outcome()
            del b, c
            gc.collect()  # the old process's 1 and 2 let go
            await slot.submit([task(big, "e")])
            e = await slot.outcome()
            assert load_outcome(d).value == big("d") and load_outcome(e).value == big("e")
            await slot.stop()
            await slot.submit([task(big, "f")])
            f = await slot.outcome()  # held: its process's outcome 0
            del d, e
            gc.collect()  # the process before's 0 and 1 let go: said to nobody
            await slot.submit([task(big, "g")])
            g = await slot.outcome()
            assert load_outcome(f).value == big("f") and load_outcome(g).value == big("g")
        finally:
            await slot.stop()

    trio.run(main)


def test_outcomes_reuse_a_memfd_only_once_released_and_only_for_a_similar_size():
    outcomes = hop.Outcomes()

    def share(data: bytes) -> tuple[int, bytes]:
        fd = outcomes.share([data[:10], memoryview(data)[10:]], len(data))
        try:
            return os.fstat(fd).st_ino, os.pread(fd, len(data), 0)
        finally:
            os.close(fd)

    first, got = share(b"x" * MIB)
    assert got == b"x" * MIB
    assert share(b"y" * MIB)[0] != first  # number 0 not released yet
    second = share(b"z" * MIB)[0]  # (number 2: 1 went with the memfd before)
    outcomes.released(1)  # not the one it went out with
    fourth = share(b"w" * MIB)[0]
    assert fourth != second
    outcomes.released(3)
    again, got = share(b"v" * (MIB - 5))
    assert again == fourth and got == b"v" * (MIB - 5) and outcomes.sent == 5
    outcomes.released(4)
    assert share(b"u" * (MIB // 4))[0] != again  # far smaller: its own memfd, the big one goes
    outcomes.released(5)
    assert share(b"t" * MIB)[0] != again  # far bigger: its own too


def test_the_daemon_says_an_outcome_is_let_go_only_once_no_view_of_it_is_left():
    outcomes, releases = hop.Outcomes(), hop.Releases()
    fd = outcomes.share([b"o" * MIB], MIB)
    view = releases.track(hop.map_outcome(fd, 0, MIB))
    os.close(fd)
    part = view[5:10]
    del view
    assert releases.notices() == b""
    del part
    gc.collect()
    assert releases.notices() == hop.HEADER.pack(hop.RELEASED, 0, 0)
    assert releases.notices() == b""


class Watched(hop.Outcomes):
    def __init__(self) -> None:
        super().__init__()
        self.dropped = threading.Event()

    def expire(self) -> None:
        super().expire()
        if not self.spare:
            self.dropped.set()


@pytest.mark.parametrize("state", ["waiting for a task", "running one"])
def test_a_task_process_lets_its_spare_memory_go_when_no_big_outcome_came_for_a_while(monkeypatch, state):
    """Idle, or busy with tasks whose outcomes are small: the memfd counts in no limit, so it goes."""
    monkeypatch.setattr(hop, "SPARE_SECONDS", 0.05)
    ours, theirs = socket.socketpair()
    outcomes = Watched()
    os.close(outcomes.share([b"s" * MIB], MIB))
    outcomes.released(0)
    inbox = taskproc._Inbox(theirs, outcomes)
    got = []
    task = hop.HEADER.pack(hop.INLINE, 0, 4) + b"task"
    if state == "running one":
        ours.sendall(task)
        got.append(inbox.next_task())  # (the inbox now takes it that a task runs)
        assert inbox.running
    waiting = threading.Thread(target=lambda: got.append(inbox.next_task()), daemon=True)
    if state == "waiting for a task":
        waiting.start()
    try:
        assert outcomes.dropped.wait(10) and not outcomes.spare
        if state == "waiting for a task":
            ours.sendall(task)
            waiting.join(10)
        assert got and bytes(got[0][0]) == b"task"
    finally:
        ours.close()
        theirs.close()


def test_a_memfd_the_daemon_still_sends_from_is_kept_and_goes_only_after_it_was_let_go(monkeypatch):
    """Over a slow uplink an outcome takes longer to send than SPARE_SECONDS: the memory is kept for the
    next outcome, and its time to go counts from when the daemon let it go."""
    monkeypatch.setattr(hop, "SPARE_SECONDS", 0.05)
    outcomes = Watched()
    os.close(outcomes.share([b"l" * MIB], MIB))  # lent: number 0
    ours, theirs = socket.socketpair()
    taskproc._Inbox(theirs, outcomes)  # (its thread expires what is due)
    try:
        assert not outcomes.dropped.wait(0.6)  # a dozen SPARE_SECONDS, twice the thread's look while idle
        outcomes.released(0)
        assert outcomes.dropped.wait(10) and not outcomes.spare
    finally:
        ours.close()
        theirs.close()
