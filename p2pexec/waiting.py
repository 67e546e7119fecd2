"""Tasks that wait on the client for the futures among their arguments.

Such a task holds no worker meanwhile: it is sent from whichever thread
finishes the last of its futures (a done callback), or fails with the
first one's exception (:mod:`p2pexec.dependencies` finds the futures and
puts their results in).  The executor asks which tasks still wait here,
to cancel them at shutdown or when one is interrupted before it was sent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from .dependencies import first_failure


class Waiting:
    """The futures of tasks not sent yet because they wait for others (any thread may add or drop one)."""

    def __init__(self) -> None:
        self.futures: set[Future[Any]] = set()

    def __contains__(self, future: Future[Any]) -> bool:
        return future in self.futures

    def hold(self, future: Future[Any], waiting_for: list[Future[Any]], send: Callable[[], None]) -> None:
        """Call ``send`` once every one of ``waiting_for`` has finished, unless ``future`` was cancelled
        meanwhile or one of them failed (then ``future`` fails with it, as it does if ``send`` raises)."""
        left = [len(waiting_for)]
        lock = threading.Lock()
        self.futures.add(future)
        future.add_done_callback(self.futures.discard)

        def one_done(_: Future[Any]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            self.futures.discard(future)
            if future.done():  # cancelled meanwhile
                return
            try:
                failure = first_failure(waiting_for)
                if failure is not None:
                    future.set_exception(failure)
                else:
                    send()
            except InvalidStateError:
                pass  # cancelled between the check and now
            except BaseException as exc:  # (a callback's error would be logged and lost: the future with it)
                with contextlib.suppress(InvalidStateError):
                    future.set_exception(exc)

        for dependency in waiting_for:
            dependency.add_done_callback(one_done)

    def cancel_all(self) -> None:
        for future in list(self.futures):
            future.cancel()
