"""Other libraries' private API that p2pexec uses, each fenced in one module: these fail loudly if it moves."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import Future, wait

import paramiko
import pytest

from p2pexec.board.ssh_transport import POLL, BoardTransport
from p2pexec.stdlib_private import cancel_running


def test_the_stdlib_still_has_what_the_fences_use():
    assert callable(threading._register_atexit)
    future: Future[int] = Future()
    assert {"_condition", "_state"} <= set(vars(future)) and callable(future._invoke_callbacks)


def test_a_running_future_cancelled_by_the_fence_looks_cancelled_to_everyone():
    future: Future[int] = Future()
    seen = []
    future.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert future.set_running_or_notify_cancel() and not future.cancel()  # the stdlib refuses
    assert cancel_running(future)
    assert future.cancelled() and future.done() and seen == [True]
    done, _ = wait([future], timeout=5)
    assert done == {future}
    finished: Future[int] = Future()
    finished.set_result(1)
    assert not cancel_running(finished) and finished.result() == 1


def test_paramiko_still_has_what_the_board_transport_uses():
    from paramiko.common import MSG_CHANNEL_REQUEST

    assert MSG_CHANNEL_REQUEST in paramiko.Transport._channel_handler_table
    assert callable(paramiko.Channel._handle_request) and callable(paramiko.Transport._auth_trigger)
    assert isinstance(paramiko.Transport._active_check_timeout, float) and callable(paramiko.Transport.stop_thread)
    a, b = socket.socketpair()
    with a, b:
        BoardTransport(a, lambda: None)  # never started: no thread, nothing sent
        assert a.gettimeout() == POLL  # the poll interval paramiko's __init__ set from the class
    assert BoardTransport._channel_handler_table[MSG_CHANNEL_REQUEST] is not \
        paramiko.Transport._channel_handler_table[MSG_CHANNEL_REQUEST]


def test_joblib_still_has_what_the_backend_uses():
    """Every name of joblib's private section of p2pexec/joblib_backend.py, used as the backend uses it."""
    joblib = pytest.importorskip("joblib")
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase, SequentialBackend
    from joblib.parallel import BatchedCalls

    from p2pexec import joblib_backend as jb

    assert jb._private_bases() == (AutoBatchingMixin, ParallelBackendBase)
    assert {"submit", "retrieve_result_callback", "abort_everything", "terminate"} <= set(vars(ParallelBackendBase))
    assert AutoBatchingMixin.MIN_IDEAL_BATCH_DURATION > 0 and callable(AutoBatchingMixin.compute_batch_size)
    with joblib.parallel_config(backend=jb.NAME, cluster="alice/friends"):  # (opens nothing yet)
        backend, _ = joblib.parallel.get_active_backend()
    assert isinstance(backend, AutoBatchingMixin) and jb._batch_history(backend)[0] == 1
    jb._set_batch_size(backend, 8)
    assert jb._batch_history(backend) == (8, AutoBatchingMixin._DEFAULT_SMOOTHED_BATCH_DURATION)
    nested = SequentialBackend()
    batch = BatchedCalls([(pow, (7, 2), {}), (pow, (9,), {"exp": 2})], (nested, 1))
    assert jb._calls_of(batch) == [(pow, (7, 2), {}), (pow, (9,), {"exp": 2})] and jb._calls_of(abs) == []
    assert jb._nesting_of(batch) == (nested, 1)
    assert jb._run_batch(pow, nested, 1, [((2, 3), {}), ((2,), {"exp": 4})]) == [8, 16]


def test_the_joblib_range_is_the_one_pinned_and_installed():
    joblib = pytest.importorskip("joblib")
    import tomllib
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    from p2pexec.joblib_backend import JOBLIB_RANGE

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert f"joblib{JOBLIB_RANGE}" in extras["joblib"] and f"joblib{JOBLIB_RANGE}" in extras["test"]
    assert joblib.__version__ in SpecifierSet(JOBLIB_RANGE)  # else the fence above tests an untested joblib
