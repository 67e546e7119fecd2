"""Yamux window updates in halves, as go-yamux sends them, instead of one per read.

py-libp2p 0.8.1's ``YamuxStream._auto_tune_and_send_window_update``
releases receive window after *every* read smaller than half the window
(its "partial slack" and ``PY_YAMUX_RELEASE_ON_READ`` branches).  A lease
stream carries many small messages (a task, a result, a credit), so each
message read cost a WINDOW_UPDATE frame: a Noise encryption, a socket write
and a wake-up of the other side, 100-300 µs of CPU per message on each end
(benchmarks/README.md).  go-yamux, which py-libp2p says it mirrors, sends an
update only once half the window has been read.  This module replaces that
one private method with the go-yamux rule and nothing else;
``tests/test_libp2p_host.py`` fails if the method or the attributes it uses
change, and counts the updates a real stream sends.

Flow control is unchanged: the sender may still have up to the whole window
in flight, and the reader releases it in halves, so a sender never waits
for a reader that has read everything.

A lease's stream also gets the largest window at once (:func:`open_wide`).
py-libp2p grows a window from 256 KiB only when updates come within four
round trips, as its ping measured them, and a sender that has used its
window looks for an update every 10 ms: a 256 MiB echo on a lease whose
window had not grown took 9.5-18 s instead of 2.4-3.3 s (benchmarks/README.md).
Both ends of a lease read it all the time, and only members hold one.
"""

from __future__ import annotations

from typing import Any

from libp2p.stream_muxer.yamux import yamux
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE, YamuxStream

#: what this module relies on in YamuxStream (checked by the tests)
USED = ("_auto_tune_and_send_window_update", "_grow_to_delta", "_apply_autotune_epoch", "send_window_update")
#: py-libp2p's ``YamuxStream._grow_threshold`` is ``target_recv_window // DIVISOR`` (0 with hysteresis
#: disabled); it read two PY_YAMUX_* variables from the environment for every message read, so they are
#: read here once, when p2pexec's transport is imported (a later change to them is not seen)
DIVISOR = 0 if yamux._yamux_disable_hysteresis() else yamux._yamux_batch_threshold_divisor()


async def _release_in_halves(self: Any, *, bytes_read: int = 0) -> None:
    """Send a WINDOW_UPDATE only once half the target window was read (go-yamux's ``sendWindowUpdate``)."""
    total = 0
    async with self.window_lock:
        self._pending_recv_release += bytes_read
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        threshold = self.target_recv_window // DIVISOR if DIVISOR else 0
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta >= threshold and delta > 0:
            total = self._grow_to_delta(buffered)
        elif self._pending_recv_release >= threshold:
            self.recv_window += self._pending_recv_release
            total = self._pending_recv_release
        if total:
            self._pending_recv_release = 0
            total += self._apply_autotune_epoch(buffered)
    if total > 0:
        await self.send_window_update(total, skip_lock=True)


def release_in_halves() -> None:
    """Install the go-yamux rule on py-libp2p's YamuxStream (idempotent)."""
    YamuxStream._auto_tune_and_send_window_update = _release_in_halves  # type: ignore[method-assign]


async def open_wide(stream: Any) -> None:
    """Let the peer send up to py-libp2p's largest window (16 MiB) ahead on ``stream``, from now on."""
    muxed = getattr(stream, "muxed_stream", None)
    if not isinstance(muxed, YamuxStream):
        return
    async with muxed.window_lock:
        buffered = len(muxed.conn.stream_buffers.get(muxed.stream_id, b""))
        muxed.target_recv_window = MAX_WINDOW_SIZE
        grow = muxed._grow_to_delta(buffered)
    if grow > 0:
        await muxed.send_window_update(grow, skip_lock=True)
