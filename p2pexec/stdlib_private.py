"""The standard library's private API that p2pexec needs, fenced in one module.

Each use says why no public API does; ``tests/test_private_apis.py`` fails
loudly if a Python release moves what they use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, FINISHED
from typing import Any


def before_threads_are_joined(fn: Callable[[], None]) -> None:
    """Run ``fn`` at interpreter exit before non-daemon threads are joined, as concurrent.futures does.

    ``atexit`` runs after that join: too late to tell the executors' loop
    threads to finish, so exit would hang on them.
    """
    threading._register_atexit(fn)  # type: ignore[attr-defined]


def cancel_running(future: Future[Any]) -> bool:
    """``Future.cancel()`` for a future already marked running, which the stdlib refuses.

    Only for a task that is not running anywhere any more (withdrawn, or
    stopped on its worker).  Ends in the state a cancelled pending future
    reaches, so ``cancelled()``, ``wait``, ``as_completed`` and asyncio all
    see a cancellation.
    """
    with future._condition:
        if future._state == FINISHED:
            return False
        if future.cancelled():
            return True
        future._state = CANCELLED
        future._condition.notify_all()
    future._invoke_callbacks()  # type: ignore[attr-defined]
    future.set_running_or_notify_cancel()  # moves it to CANCELLED_AND_NOTIFIED and tells the waiters
    return True
