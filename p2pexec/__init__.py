"""p2pexec: a concurrent.futures Executor whose workers are your friends' machines."""

from __future__ import annotations

__version__ = "0.1.0"
