"""Eager locks: a free lock is taken without a turn of trio's loop, a held one is waited for in order."""

from __future__ import annotations

import pytest
import trio

from p2pexec.transport.eager_locks import EagerLock, EagerSemaphore

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("make", [EagerLock, lambda: EagerSemaphore(1)], ids=["lock", "semaphore"])
def test_a_free_lock_is_taken_without_yielding_and_a_held_one_in_order(make):  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[int, list[int]]:
        lock = make()
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                turns += 1
                await trio.lowlevel.checkpoint()

        order: list[int] = []

        async def waiter(i: int) -> None:
            async with lock:
                order.append(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_turns)
            while not turns:
                await trio.lowlevel.checkpoint()
            before = turns
            for _ in range(100):
                async with lock:
                    pass
            others_ran = turns - before  # trio's own Lock lets count_turns run 100 times here
            await lock.acquire()
            for i in range(5):
                nursery.start_soon(waiter, i)
                while lock.statistics().tasks_waiting <= i:
                    await trio.lowlevel.checkpoint()
            lock.release()
            while len(order) < 5:
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        return others_ran, order

    others_ran, order = trio.run(scenario)
    assert others_ran == 0
    assert order == [0, 1, 2, 3, 4]  # waiters are served first come, first served


def test_waiting_for_a_held_lock_can_be_cancelled():
    async def scenario() -> bool:
        lock, done = EagerLock(), trio.Event()

        async def hold() -> None:
            async with lock:
                await done.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            while not lock.locked():
                await trio.lowlevel.checkpoint()
            with trio.move_on_after(0.05) as scope:
                await lock.acquire()
            done.set()
        async with lock:  # free again: the cancelled wait left nothing queued
            pass
        return scope.cancelled_caught

    assert trio.run(scenario)


@pytest.mark.parametrize("seed", range(5))
def test_never_more_holders_than_the_lock_allows_though_waiters_are_cancelled(seed):
    """A release hands over to the first waiter still waiting; a cancelled waiter holds nothing."""
    import random

    rng = random.Random(seed)

    async def scenario(make, most: int) -> int:
        lock, holders, served = make(), [0], [0]

        async def user(patience: float | None) -> None:
            with trio.move_on_after(patience if patience is not None else 60):
                async with lock:
                    holders[0] += 1
                    try:
                        assert holders[0] <= most
                        served[0] += 1
                        for _ in range(rng.randrange(3)):
                            await trio.sleep(0)
                    finally:
                        holders[0] -= 1

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(user, rng.choice([None, None, 0, 1e-4]))
                if rng.random() < 0.3:
                    await trio.sleep(0)
        assert lock.value == most and not lock.statistics().tasks_waiting  # all returned, nobody left queued
        return served[0]

    assert trio.run(scenario, EagerLock, 1) > 0
    assert trio.run(scenario, lambda: EagerSemaphore(3), 3) > 0
    with pytest.raises(RuntimeError):
        EagerLock().release()
