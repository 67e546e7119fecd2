"""paramiko's Transport as the board needs it: the one place that reaches into paramiko's private API.

paramiko has no public hook for any of the three needs, so they are fenced
here and ``tests/test_private_apis.py`` fails loudly if a paramiko release
moves what they use (``Transport._channel_handler_table``,
``Channel._handle_request``, ``Transport._auth_trigger``,
``Transport._active_check_timeout``, ``Transport.stop_thread``; the
paramiko of the test extra is what CI checks).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

# Seconds between the idle checks of a connection's thread: a keepalive (every 15 s) goes out at
# most this late, and a login deadline is noticed this late at worst (the board's admission
# thread shuts late connections down anyway, which wakes them).
POLL = 5.0


def _start_after_reply(chan: paramiko.Channel, m: paramiko.Message) -> None:
    paramiko.Channel._handle_request(chan, m)
    start = chan.transport.pending_starts.pop(chan.get_id(), None)
    if start is not None:
        start()


class BoardTransport(paramiko.Transport):
    """A Transport that starts a session only once its exec request is answered.

    paramiko replies to an exec request after ``check_channel_exec_request``
    returns; a session started from there could send its output, exit status
    and close first, and a paramiko client's ``exec_command`` then fails with
    "Channel closed".  So the start is queued and run after the reply.
    """

    # paramiko's thread of each connection wakes every 0.1 s to see whether it was closed and whether a
    # keepalive is due.  With a thousand connections that is 10,000 wake-ups a second, each taking the
    # GIL: the board spent half a core doing nothing, and past that its threads queued for the GIL
    # faster than they got it (load average 1,000, 88% system time, not one line relayed).  Woken
    # every POLL seconds instead, and at once by stop_thread() below, a connection costs nothing idle.
    _active_check_timeout = POLL

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,
        MSG_CHANNEL_REQUEST: _start_after_reply,
    }

    def __init__(self, sock: socket.socket, on_login: Callable[[], None]) -> None:
        super().__init__(sock)
        self.pending_starts: dict[int, Callable[[], None]] = {}
        self.started: set[int] = set()  # channel ids that already have a command
        self._on_login = on_login

    def stop_thread(self) -> None:
        """Wake the thread from its read (closing the socket does not) before paramiko's stop."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        super().stop_thread()

    def _auth_trigger(self) -> None:
        """paramiko's hook once a login succeeded (the signature checked): tell the admission."""
        super()._auth_trigger()
        self._on_login()
