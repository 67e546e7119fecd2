"""How many slots to ask for, offer and accept, and which peers can work together: pure rules shared by both
sides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# What clients and workers say to each other (board bodies, lease frames) changes between releases, and an
# older side would misread a newer one's frames.  Both sides send the revision they speak ("rev"); sides of
# different revisions never lease, and the client says which side to upgrade.  Bump it with any change an
# older release would misread.  Releases before the field was sent are revision 1.  (messages.VERSION is the
# signed envelope's format: peers of another VERSION drop each other's lines unread, with no hint to anyone.)
# 3: channels seal chunks with AEGIS-256 or XChaCha20-Poly1305 (25-byte headers), no longer secretstream
REVISION = 4  # 4: values are named by their BLAKE3, no longer a tree of SHA-256


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


def revision_in(body: Mapping[str, Any]) -> int | None:
    """The revision a message's sender speaks: 1 when it does not say (an older release), None when garbled."""
    value = body.get("rev", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def credit_window(slots: int, mean_task_seconds: float | None, *, queue_seconds: float = 0.01,
                  long_task_seconds: float = 0.1, max_queued: int = 16) -> int:
    """Tasks a worker lets a client have outstanding: running plus queued per slot.

    Queueing saves a slot the round trip to fetch its next task, which only
    matters for short tasks, and it can leave a task waiting behind a long
    one while another worker idles.  So: nothing queued until a task's
    duration is known or when tasks are long; otherwise about
    ``queue_seconds`` of work per slot (at least one task, at most
    ``max_queued``), so short tasks travel in batches.  10 ms: a message
    costs both ends a few hundred microseconds whatever it holds, so a
    window of 2 ms let a busy machine (where a no-op task measures 1 ms)
    queue two tasks and send nearly one message per task; and a slot
    idles no longer than 10 ms behind another's queue.
    """
    if mean_task_seconds is None or mean_task_seconds >= long_task_seconds:
        return slots
    queued = max(1, min(max_queued, int(queue_seconds / max(mean_task_seconds, 1e-9))))
    return slots * (1 + queued)
