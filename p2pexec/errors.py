"""Exceptions a p2pexec user may see.  Each message says what to do next."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class P2PExecError(Exception):
    """Base class of every p2pexec error."""


class ConfigurationError(P2PExecError):
    """A key, members file or option is missing or malformed."""


class BoardError(P2PExecError):
    """The message board could not be used."""


class BoardConnectionError(BoardError):
    """The board host could not be reached."""


class BoardBusyError(BoardConnectionError):
    """The board did not answer in time, or closed the connection before we logged in.

    An overloaded or flooded board sheds connections this way, as does a
    flaky network: worth another try, which :class:`P2PExecutor` makes for a
    while before raising it.
    """


class HostKeyError(BoardError):
    """The board's SSH host key is unknown or does not match known_hosts."""


class AuthenticationError(BoardError):
    """The board rejected our SSH key."""


class AccessDeniedError(BoardError):
    """The board refused to let us join the cluster's topic."""


class ProtocolError(P2PExecError):
    """A peer sent something that breaks the protocol; the peer is dropped."""


class TaskProcessDiedError(P2PExecError):
    """The worker's task process died while running the task (crash, os._exit, OOM)."""


class WorkerLostError(P2PExecError):
    """A task was lost with its worker too many times."""


class ResultTooLargeError(P2PExecError):
    """A worker sent (or claimed) a result bigger than the executor's ``max_result_size``."""


class NoWorkersError(P2PExecError):
    """No worker offered to run the task within ``worker_timeout``."""


class MissingPackageError(P2PExecError, ImportError):
    """No worker has a distribution the task needs (or the version it needs).

    An :class:`ImportError` too, so code that already handles a missing
    import handles this; ``name`` is the distribution.  ``version`` is the
    client's version, or a specifier from ``requires=`` ('>=2'), or None;
    ``workers`` maps each worker that was asked to the version it has (None: none).
    """

    def __init__(self, dist: str, version: str | None, workers: Mapping[str, str | None]) -> None:
        from .environment import install_command  # not at the top: keeps packaging out of task processes' start

        self.dist, self.version, self.workers = dist, version, dict(workers)
        if version and version[0].isalnum():
            wanted = f"{dist} {version}, the client's version,"
        else:
            wanted = f"{dist}{version or ''}"
        lacking = [f"{w} has {found}" if found else f"{w} lacks it" for w, found in sorted(self.workers.items())]
        if len(lacking) > 8:
            lacking[8:] = [f"and {len(lacking) - 8} more"]
        where = "; ".join(lacking) if lacking else "no worker is online"
        super().__init__(f"the task needs {wanted} but no worker has it: {where}. "
                         f"To run it there: {install_command(dist, version)}", name=dist)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.dist, self.version, self.workers)


class RemoteTraceback(Exception):
    """Carries the worker-side traceback as the ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def first_leaf(group: BaseException) -> Any:
    """The first exception inside a (nested) exception group: what ``except*`` matched, to report or handle."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
