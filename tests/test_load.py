"""64 members' clients and 32 workers on one board keep working while two strangers flood it (issue 15).

Slow (about 2.5 minutes on 2 cores), so .ci/run runs it on its own, after the
parallel suite: ``pytest -m load``.
"""

from __future__ import annotations

import pytest

from .load import CLIENTS, run

pytestmark = [pytest.mark.load, pytest.mark.timeout(780)]  # clients get 420 s: a slow CI machine took 2.3x this one's time


def test_every_member_gets_every_result_while_the_board_and_a_worker_are_flooded():
    report = run()
    assert report["all results right"] == CLIENTS, report
    assert not report["errors"] and not report["still running"], report
    board_flood, worker_flood = report["flood sockets opened (board, worker)"]
    assert board_flood > 300 and worker_flood >= 300, report  # the floods ran, and were re-opened as closed
