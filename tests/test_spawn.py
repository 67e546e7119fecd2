"""Task processes started from the daemon's own thread (worker/spawn.py): waited for, killed, timed out."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import trio

from p2pexec.worker.spawn import start_child

pytestmark = pytest.mark.timeout(60)
WAYS = [pytest.param(True, id="pidfd"), pytest.param(False, id="thread")]


@pytest.fixture(params=WAYS)
def way(request, monkeypatch):
    if not request.param:
        monkeypatch.delattr(os, "pidfd_open", raising=False)  # as where Linux has no pidfd (or no Linux)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd here")
    return request.param


def test_a_child_is_waited_for_and_reaped(way):
    async def main():
        child = start_child([sys.executable, "-c", "import sys; sys.exit(3)"])
        assert await child.wait() == 3
        assert child.returncode == 3 and await child.wait() == 3

    trio.run(main)


def test_a_wait_that_times_out_leaves_the_child_to_be_killed(way):
    async def main():
        child = start_child([sys.executable, "-c", "import time; time.sleep(60)"])
        with trio.move_on_after(0.2) as waited:
            await child.wait()
        assert waited.cancelled_caught and child.returncode is None
        child.kill()
        with trio.fail_after(10):
            assert await child.wait() == -signal.SIGKILL
        child.kill()  # once reaped: nothing happens

    trio.run(main)
