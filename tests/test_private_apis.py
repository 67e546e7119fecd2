"""Other libraries' private API that p2pexec uses, each fenced in one module: these fail loudly if it moves."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import Future, wait

import paramiko

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
