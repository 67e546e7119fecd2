"""A trio event loop in a background thread, for synchronous callers."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from .errors import first_leaf

T = TypeVar("T")


async def in_thread_until_cancelled(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread, left to finish alone if we are cancelled meanwhile (it must be harmless so)."""
    # (trio_typing's stubs, which libp2p installs, predate abandon_on_cancel and shadow trio's own types)
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)  # type: ignore[call-arg]


class TrioThread:
    """Runs ``main(task_status)`` under trio in a daemon thread.

    ``main`` calls ``task_status.started()`` once it is ready to serve; the
    constructor returns then, or re-raises what ``main`` raised while
    starting.  ``token`` lets other threads call in.
    """

    def __init__(self, main: Callable[..., Awaitable[None]], name: str) -> None:
        self._main = main
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = first_leaf(exc)  # trio's nursery wraps it: the caller catches OSError, say
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._main)
            self._ready.set()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function on the loop; never blocks."""
        assert self.token is not None
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def run(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run an async function on the loop and wait for its result."""
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function on the loop and wait for its result (at once when called on the loop: a done
        callback runs there)."""
        if self.here:
            return fn(*args)
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    @property
    def here(self) -> bool:
        """Whether the caller runs on the loop itself, which must not wait for the loop."""
        return threading.current_thread() is self._thread

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
