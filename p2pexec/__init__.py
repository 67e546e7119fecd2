"""p2pexec: a concurrent.futures Executor whose workers are your friends' machines."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    AccessDeniedError,
    AuthenticationError,
    BoardBusyError,
    BoardConnectionError,
    BoardError,
    ConfigurationError,
    HostKeyError,
    MissingPackageError,
    NoWorkersError,
    P2PExecError,
    ProtocolError,
    RemoteTraceback,
    ResultTooLargeError,
    TaskProcessDiedError,
    WorkerLostError,
)
from .joblib_backend import install as _install_joblib_backend
from .seeding import task_rng, task_seed
from .stats import ExecutorStats, WorkerStats
from .whereami import WorkerInfo, current_worker

_install_joblib_backend()  # backend="p2pexec" for joblib, whether it is imported before p2pexec or after


def __getattr__(name: str) -> type:  # task processes import p2pexec too: keep SSH, trio and libp2p out of them
    if name == "UntrustedResultError":
        from .results import UntrustedResultError

        return UntrustedResultError
    if name == "RemoteError":
        from .tasks import RemoteError

        return RemoteError
    if name == "P2PExecutor":
        from .executor import P2PExecutor

        return P2PExecutor
    if name == "LocalCluster":
        from .local import LocalCluster

        return LocalCluster
    raise AttributeError(f"module 'p2pexec' has no attribute {name!r}")


__all__ = [
    "P2PExecutor", "LocalCluster", "RemoteTraceback", "P2PExecError", "ConfigurationError", "BoardError",
    "BoardConnectionError", "BoardBusyError", "HostKeyError", "AuthenticationError", "AccessDeniedError", "ProtocolError",
    "TaskProcessDiedError", "WorkerLostError", "NoWorkersError", "ResultTooLargeError", "UntrustedResultError", "RemoteError",
    "MissingPackageError", "ExecutorStats", "WorkerStats", "task_rng", "task_seed", "current_worker", "WorkerInfo",
]
