"""How many slots to ask for, offer and accept: pure rules shared by both sides."""

from __future__ import annotations


def slots_wanted(pending: int, inflight: int, leased: int, max_workers: int) -> int:
    """Extra slots a client should lease now: enough for its work, never past max_workers."""
    return max(0, min(max_workers, pending + inflight) - leased)


def slots_to_offer(free: int, requested: int) -> int:
    """Slots a worker offers to a request: what it has free, at most what was asked."""
    return max(0, min(free, requested))


def slots_to_accept(offered: int, wanted: int) -> int:
    return max(0, min(offered, wanted))


def python_compatible(mine: str, theirs: str) -> bool:
    """Bytecode and pickles of functions only load on the same Python major.minor."""
    return mine == theirs
