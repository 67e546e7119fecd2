"""py-libp2p built and patched the only way p2pexec accepts: TCP, Noise, yamux, our limits.

Kept apart from :mod:`p2pexec.transport.host` because everything here is
about py-libp2p 0.8.1 itself (its constructor, its defaults we override, the
private behaviour we patch), not about how p2pexec uses a host: when
py-libp2p changes, this is the file to read.  Plaintext and secio are never
offered (``new_host``'s defaults would accept them); py-libp2p's own limits
are set below (``_connection_config``, ``_resource_manager``), each with the
reason for its value; its auto-connector never runs (``_no_auto_dials``),
yamux releases its receive window in halves (:mod:`.yamux_window`), the
locks it takes for every message do not yield when free (``eager_locks``),
a yamux frame is written without a debug line built for nothing and a
second turn of trio's loop, a one-frame message without context-managed
locks, and a body that came decrypted with its header is taken without a
deadline (``lean_frames``), a TCP connection is read ahead
(:mod:`.tcp_stream`) and its connections log through a logger of their
own, not the application's root logger (``_log_through_own_logger``).
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import types
from collections.abc import Callable
from typing import Any

import trio
from libp2p import new_host
from libp2p.abc import IHost, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection import swarm_connection
from libp2p.network.stream.net_stream import NetStream
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.rcmgr import ResourceLimits, ResourceManager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.rw_lock import ReadWriteLock
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from ..logs import after_libp2p_import
from .admission import Limits
from .eager_locks import EagerLock, EagerSemaphore
from . import tcp_stream
from .yamux_window import release_in_halves

after_libp2p_import()

# py-libp2p's yamux sends a WINDOW_UPDATE frame after every read unless told
# otherwise; go-yamux's half-window hysteresis (what remains) is enough and
# saves a frame, a write and a wake-up per message.  A user's setting wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
DIAL_TIMEOUT = 5.0  # one dial (TCP, Noise, yamux); Libp2pHost gives each address of a peer as long



def _log_through_own_logger(module: types.ModuleType) -> None:
    """Point ``module``'s ``logging.debug(...)`` calls at its own logger (quiet under "libp2p").

    Through the root logger, the first of them (one per connection) ran
    ``logging.basicConfig()``: the application's own later call then did
    nothing, and p2pexec's warnings took the root's format.
    """
    logger = logging.getLogger(module.__name__)
    named = types.ModuleType("logging")
    named.__dict__.update(vars(logging))
    for level in ("debug", "info", "warning", "error", "exception", "critical", "log"):
        setattr(named, level, getattr(logger, level))
    setattr(module, "logging", named)


_log_through_own_logger(swarm_connection)  # (the only module of our stack that logs through the root logger)

# py-libp2p's own connection limits.  Its defaults are go-libp2p's for a DHT
# node (keep 50-100 peers connected, dial more, prune above 300); a worker or
# a relay only answers peers that come to it.
MAX_CONNECTIONS = 1024  # established or upgrading; a relay's members and a busy worker's clients fit
UPGRADE_SECONDS = Limits.handshake_seconds  # Noise + yamux negotiation; the gate closes it at the same time
STREAM_NEGOTIATION_SECONDS = 10.0  # multistream-select for a new stream (py-libp2p's default; ms in practice)
MAX_STREAMS = 8192  # py-libp2p's stream semaphore over all peers (leases use one stream each, relays two)


def _connection_config(per_peer: int) -> ConnectionConfig:
    return ConnectionConfig(
        max_connections_per_peer=per_peer,  # 1 avoids py-libp2p's 250 ms dial delay; 4 for relayed + direct
        max_connections=MAX_CONNECTIONS,
        # The swarm lets (max - min) connections in before any authentication; with
        # min 0 that is all of them, and the gate (not this count) stops strangers.
        # (The auto-connector, which would dial towards their midpoint, never runs: _no_auto_dials.)
        # High = max keeps the pruner from closing members' connections below the cap.
        min_connections=0, low_watermark=0, high_watermark=MAX_CONNECTIONS,
        inbound_upgrade_timeout=UPGRADE_SECONDS,
        outbound_upgrade_timeout=UPGRADE_SECONDS,  # a peer that stalls our handshake is as useless
        inbound_stream_protocol_negotiation_timeout=STREAM_NEGOTIATION_SECONDS,
        outbound_stream_protocol_negotiation_timeout=STREAM_NEGOTIATION_SECONDS,
        dial_timeout=DIAL_TIMEOUT,
    )


def _resource_manager() -> ResourceManager:
    """py-libp2p's resource manager with limits matching the above (its own are 256 inbound, a breaker, ...)."""
    return ResourceManager(
        limits=ResourceLimits(max_connections=MAX_CONNECTIONS, max_streams=MAX_STREAMS),
        connection_limits=ConnectionLimits(
            max_pending_inbound=Limits.strangers + Limits.reserve,  # what the gate lets in unproven
            max_pending_outbound=64,
            max_established_inbound=MAX_CONNECTIONS, max_established_outbound=MAX_CONNECTIONS,
            max_established_per_peer=4, max_established_total=MAX_CONNECTIONS),
        # Its circuit breaker would refuse every connection for 60 s after 5 internal
        # errors: one peer's trouble must not lock out the others.
        enable_circuit_breaker=False,
        # Per peer id, after the handshake: a peer re-connecting 50 times in a burst is
        # a bug or an attack (keys are free, so this is no defence against strangers).
        enable_rate_limiting=True, connections_per_peer_per_sec=10.0, burst_connections_per_peer=50.0,
        enable_prometheus=False,
    )


def _no_auto_dials(swarm: Any) -> None:
    """Keep py-libp2p's AutoConnector from ever starting: p2pexec hosts make only the connections they decide on.

    py-libp2p 0.8.1 dials peers from its peer store until (low + high
    watermark) / 2 connections are open: 512 with the watermarks above, so a
    worker dialled back every client that ever reached it and a client every
    worker it once leased, each a Noise handshake on both sides.  It has no
    switch (``auto_connect_interval`` must be positive), so its ``start`` is
    made a no-op; ``tests/test_libp2p_host.py`` fails if that stops working.
    """
    async def stay_stopped() -> None:
        return None

    swarm.auto_connector.start = stay_stopped


def new_libp2p_host(listen: list[Any], transport: Any, per_peer: int, seed: bytes | None = None) -> IHost:
    """A py-libp2p host listening on ``listen`` over ``transport`` (TCP), Noise and yamux only.

    Its key is fresh, or made from ``seed`` (32 bytes: a relay whose peer
    id members were given keeps it).  ``per_peer``: connections per peer
    (1 avoids py-libp2p's 250 ms dial delay; 4 lets a relayed and a direct
    connection live side by side).
    """
    key_pair = create_new_key_pair(seed)
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(key_pair, create_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
        transports=[transport],
        connection_config=_connection_config(per_peer),
        resource_manager=_resource_manager(),
    )
    _no_auto_dials(host.get_network())
    release_in_halves()
    eager_locks()
    lean_frames()
    tcp_stream.install()
    return host


#: the locks each py-libp2p class creates in its constructor and takes for every message (checked by the tests)
EAGER_LOCKS: dict[type, tuple[str, ...]] = {
    TrioTCPStream: ("read_lock", "write_lock"),
    NetStream: ("_state_lock",),
    YamuxStream: ("window_lock", "close_lock"),
    Yamux: ("streams_lock", "_write_lock"),
    ReadWriteLock: ("_readers_lock",),  # and its writer's Semaphore(1)
}


def _with_eager_locks(init: Callable[..., None], names: tuple[str, ...]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name in names:
            setattr(self, name, EagerLock())
        if isinstance(self, ReadWriteLock):
            self._writer_lock = EagerSemaphore(1)  # type: ignore[assignment]
    __init__.eager = True  # type: ignore[attr-defined]
    return __init__


def eager_locks() -> None:
    """Replace the locks py-libp2p creates for each connection and stream with :mod:`.eager_locks`' (idempotent).

    Each free lock taken was a turn of trio's loop; a round trip took about
    a dozen on each end, about 10% of its time (benchmarks/README.md).
    """
    for cls, names in EAGER_LOCKS.items():
        init = getattr(cls, "__init__")
        if not getattr(init, "eager", False):
            setattr(cls, "__init__", _with_eager_locks(init, names))


#: py-libp2p's own ``Yamux._write_frame``, which :func:`lean_frames` stands in for
ORIGINAL_WRITE_FRAME = Yamux._write_frame


async def _write_frame(self: Any, data: bytes) -> None:
    if yamux_module.logger.isEnabledFor(logging.DEBUG):  # (its "YAMUX TX" line is wanted)
        await trio.lowlevel.checkpoint_if_cancelled()  # (as below: py-libp2p's does not check before it encrypts)
        return await ORIGINAL_WRITE_FRAME(self, data)
    async with self._write_lock:
        # the one place a cancelled writer stops, before its frame is encrypted (a free Eager lock does not
        # check): encrypted and then cancelled at its socket write, it would leave the connection's Noise nonce
        # ahead of its peer's, and every stream on it broken
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.secured_conn.write(data)


#: py-libp2p's own ``YamuxStream.write``, which :func:`lean_frames` puts behind a shortcut
ORIGINAL_STREAM_WRITE = YamuxStream.write
#: a yamux frame, header included, that fits one Noise message (py-libp2p's 64 KiB frames took two)
FRAME_BYTES = MAX_PLAINTEXT_LENGTH
_ONE_FRAME = FRAME_BYTES - yamux_module.HEADER_SIZE


async def _stream_write(self: Any, data: bytes) -> None:
    size = len(data)
    if not (0 < size <= _ONE_FRAME and size <= self.send_window and not self.send_closed and not self.closed
            and self.rw_lock._writer_lock.value and not yamux_module.logger.isEnabledFor(logging.DEBUG)):
        return await ORIGINAL_STREAM_WRITE(self, data)  # several frames, a full window, a writer ahead, or closed
    self.send_window -= size  # (no await since the checks: no other task saw the window in between)
    await self.conn._write_frame(struct.pack(
        yamux_module.YAMUX_HEADER_FORMAT, 0, yamux_module.TYPE_DATA, 0, self.stream_id, size) + data)


#: py-libp2p's own ``Yamux._read_data_body``, which :func:`lean_frames` puts behind a shortcut
ORIGINAL_READ_DATA_BODY = Yamux._read_data_body


async def _read_data_body(self: Any, length: int) -> bytes:
    session = self.secured_conn  # a SecureSession: the last Noise message read, decrypted, and how far read
    if isinstance(session, SecureSession) and session.high_watermark - session.low_watermark >= length:
        return session._drain(length)
    return await ORIGINAL_READ_DATA_BODY(self, length)


def lean_frames() -> None:
    """Yamux frames without what py-libp2p did for each besides reading and writing it (idempotent).

    ``_write_frame`` built its debug line (unpacking the header, flag
    names, an f-string) whether or not debug logging is on, and took a
    checkpoint after the write, a turn of trio's loop that waits for
    nothing (the TCP write is a checkpoint already).  ``_read_data_body``
    read the environment for a timeout and set a deadline (a cancel scope)
    for every body, though a body sent with its header (as yamux sends a
    DATA frame) came decrypted in the same Noise message: such a body is
    taken from the session at once; any other is read as before.
    ``YamuxStream.write`` of a message that fits one frame and the send
    window built a debug line too, and took its stream's write lock and
    window lock through context managers around a frame built with no
    await in between: such a message goes as one frame at once.
    Together 5-10% of a small task's round trip (benchmarks/README.md).

    And a frame, header included, is at most one Noise message's plaintext
    (:data:`FRAME_BYTES`): py-libp2p's 64 KiB frames plus their header went
    out as a full Noise message and one of 17 bytes, each with its own
    encryption, length, tag and socket write, and a body split so could not
    be taken at once.
    """
    yamux_module.MAX_MESSAGE_SIZE = FRAME_BYTES  # (YamuxStream.write reads it for every frame)
    YamuxStream.write = _stream_write  # type: ignore[method-assign]
    Yamux._write_frame = _write_frame  # type: ignore[method-assign]
    Yamux._read_data_body = _read_data_body  # type: ignore[method-assign]


class Notifee(INotifee):
    """py-libp2p's network notifications, each ignored unless a subclass overrides it."""

    async def connected(self, network: Any, conn: Any) -> None: ...
    async def disconnected(self, network: Any, conn: Any) -> None: ...
    async def opened_stream(self, network: Any, stream: Any) -> None: ...
    async def closed_stream(self, network: Any, stream: Any) -> None: ...
    async def listen(self, network: Any, multiaddr: Any) -> None: ...
    async def listen_close(self, network: Any, multiaddr: Any) -> None: ...
