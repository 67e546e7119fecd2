"""p2pexec: a concurrent.futures Executor whose workers are your friends' machines."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    AccessDeniedError,
    AuthenticationError,
    BoardConnectionError,
    BoardError,
    ConfigurationError,
    HostKeyError,
    NoWorkersError,
    P2PExecError,
    ProtocolError,
    TaskProcessDiedError,
    WorkerLostError,
)
from .executor import P2PExecutor
from .tasks import RemoteTraceback


def __getattr__(name: str):  # LocalCluster pulls in the board server: load it on first use
    if name == "LocalCluster":
        from .local import LocalCluster

        return LocalCluster
    raise AttributeError(f"module 'p2pexec' has no attribute {name!r}")


__all__ = [
    "P2PExecutor", "LocalCluster", "RemoteTraceback", "P2PExecError", "ConfigurationError", "BoardError",
    "BoardConnectionError", "HostKeyError", "AuthenticationError", "AccessDeniedError", "ProtocolError",
    "TaskProcessDiedError", "WorkerLostError", "NoWorkersError",
]
