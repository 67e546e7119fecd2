"""How many slots to ask for, offer and accept: pure rules shared by both sides."""

from __future__ import annotations


def slots_wanted(pending: int, inflight: int, leased: int, max_workers: int) -> int:
    """Extra slots a client should lease now: enough for its work, never past max_workers."""
    return max(0, min(max_workers, pending + inflight) - leased)


def should_request(wanted: int, last_asked: int, since_last: float, every: float) -> bool:
    """Ask the board for workers now?

    At once when demand has doubled since the last request, so a burst of
    submits is matched within a few messages (log2 of the burst) rather
    than one per submit or one per ``every`` seconds; otherwise every
    ``every`` seconds while slots are still wanted.
    """
    return wanted > 0 and (wanted >= 2 * last_asked or since_last >= every)


def slots_to_offer(free: int, requested: int) -> int:
    """Slots a worker offers to a request: what it has free, at most what was asked."""
    return max(0, min(free, requested))


def slots_to_accept(offered: int, wanted: int) -> int:
    return max(0, min(offered, wanted))


def python_compatible(mine: str, theirs: str) -> bool:
    """Bytecode and pickles of functions only load on the same Python major.minor."""
    return mine == theirs
