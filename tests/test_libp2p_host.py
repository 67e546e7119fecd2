"""Our libp2p host makes only the connections it decides on (issue 16: py-libp2p's auto-connector), and the
behaviours of py-libp2p we patch stay patched."""

from __future__ import annotations

import contextlib
import inspect
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from p2pexec.transport.host import Libp2pHost

pytestmark = pytest.mark.timeout(60)


def test_a_host_never_dials_the_peers_it_knows_of_on_its_own():
    """py-libp2p 0.8.1 would dial peers of its peer store towards 512 connections; ours never does."""

    async def scenario() -> tuple[int, int]:
        async with Libp2pHost().running() as worker, Libp2pHost().running() as client:
            swarm = client._host.get_network()
            swarm.peerstore.add_addrs(worker._host.get_id(), worker._host.get_addrs(), 3600)  # as identify does
            await swarm.auto_connector.maybe_connect()  # what its background task and every disconnect would run
            return len(swarm.peerstore.peers_with_addrs()), len(swarm.get_connections(worker._host.get_id()) or [])

    known, connections = trio.run(scenario)
    assert known >= 1  # the peer store knows the worker, with an address to dial
    assert connections == 0, "py-libp2p's auto-connector dialled: see _no_auto_dials in libp2p_config.py"


def test_a_reader_of_many_small_messages_releases_window_in_halves(monkeypatch):
    """py-libp2p 0.8.1 sent a yamux WINDOW_UPDATE per read; ours sends one per half window (yamux_window.py)."""
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    from p2pexec.transport import yamux_window
    from p2pexec.transport.channel import FramedStream

    assert all(hasattr(YamuxStream, name) for name in yamux_window.USED), "py-libp2p changed: see yamux_window.py"
    for window in (256 * 1024, 16 * 1024 * 1024):  # the threshold it reads once is py-libp2p's
        ours = window // yamux_window.DIVISOR if yamux_window.DIVISOR else 0
        assert YamuxStream._grow_threshold(SimpleNamespace(target_recv_window=window)) == ours
    updates: list[int] = []
    send_update = YamuxStream.send_window_update

    async def counted(self, increment, skip_lock=False):  # type: ignore[no-untyped-def]
        updates.append(increment)
        await send_update(self, increment, skip_lock=skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    count, size = 2000, 200

    async def scenario() -> list[bytes]:
        got: list[bytes] = []
        done = trio.Event()

        async def serve(stream):  # type: ignore[no-untyped-def]
            framed = FramedStream(stream)
            for _ in range(count):
                message = await framed.recv()
                assert message is not None
                got.append(message)
            done.set()

        async with Libp2pHost().running() as worker, Libp2pHost().running() as client:
            worker.set_handler(serve)
            framed = FramedStream(await client.open_stream(worker.peer_id, worker.addrs))
            for i in range(count):
                await framed.send(i.to_bytes(4, "big") * (size // 4))
            with trio.fail_after(30):
                await done.wait()
        return got

    got = trio.run(scenario)
    assert [int.from_bytes(m[:4], "big") for m in got] == list(range(count))  # all arrived, in order
    moved = count * (size + 4)  # FramedStream's length prefix
    assert 0 < len(updates) <= 2 * moved // (128 * 1024) + 2, f"{len(updates)} window updates for {count} messages"


def test_every_lock_a_lease_stream_takes_per_message_is_eager():
    """py-libp2p's per-message locks are replaced (libp2p_config.eager_locks); fails if py-libp2p renames one."""
    from libp2p.stream_muxer.rw_lock import ReadWriteLock

    from p2pexec.transport.eager_locks import Eager
    from p2pexec.transport.libp2p_config import EAGER_LOCKS

    async def scenario() -> dict[str, object]:
        async with Libp2pHost().running() as worker, Libp2pHost().running() as client:
            worker.set_handler(lambda stream: trio.sleep_forever())
            stream = await client.open_stream(worker.peer_id, worker.addrs)
            yamux_stream = stream.muxed_stream
            yamux = yamux_stream.conn
            tcp = yamux.secured_conn.conn.read_writer.read_write_closer  # Noise reads the raw connection
            return {"net": stream, "yamux_stream": yamux_stream, "yamux": yamux, "tcp": tcp.stream,
                    "rw": yamux_stream.rw_lock}

    found = trio.run(scenario)
    for obj in found.values():
        names = next(names for cls, names in EAGER_LOCKS.items() if isinstance(obj, cls))
        for name in names:
            assert isinstance(getattr(obj, name), Eager), f"{type(obj).__name__}.{name}: see libp2p_config.py"
    rw = found["rw"]
    assert isinstance(rw, ReadWriteLock) and isinstance(rw._writer_lock, Eager)


@pytest.mark.parametrize("seed", range(3))
def test_reading_ahead_keeps_the_bytes_of_a_tcp_connection_in_order(seed):
    """tcp_stream.py: whatever sizes readers ask for, concurrently or not, the bytes come out as they went in."""
    import random

    from libp2p.io.trio import TrioTCPStream

    from p2pexec.transport.tcp_stream import READ_AHEAD, install

    install()
    rng = random.Random(seed)
    sent = rng.randbytes(3 * READ_AHEAD + 12345)

    async def scenario() -> bytes:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        received: list[bytes] = []

        async def send() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            at = 0
            while at < len(sent):
                step = rng.choice([1, 2, 17, 1000, READ_AHEAD + 3])
                await stream.send_all(sent[at:at + step])
                at += step
                await trio.sleep(0)
            await stream.aclose()

        async def read(tcp: TrioTCPStream) -> None:
            while data := await tcp.read(rng.choice([None, 1, 2, 100, 5000, 2 * READ_AHEAD])):
                received.append(data)  # in the order the reads returned
                await trio.sleep(0)  # so that another reader may be waiting on the socket while bytes are kept

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                tcp = TrioTCPStream(await listeners[0].accept())
                async with trio.open_nursery() as readers:
                    for _ in range(3):
                        readers.start_soon(read, tcp)
                await listeners[0].aclose()
        return b"".join(received)

    assert trio.run(scenario) == sent


@pytest.mark.parametrize("seed", range(3))
def test_writes_sent_at_once_leave_a_tcp_connection_whole_and_in_order(seed, monkeypatch):
    """tcp_stream.py: small writes of a writer that waits next skip trio's send_all, yet concurrent writers,
    partial sends and big writes interleave only whole messages; a closed or reset connection answers as
    py-libp2p's."""
    import random
    import socket
    import struct

    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.io.trio import TrioTCPStream

    from p2pexec.transport.tcp_stream import AT_ONCE, AT_ONCE_WRITER, install

    install()
    rng = random.Random(seed)
    through_trio: list[int] = []
    send_all = trio.SocketStream.send_all

    async def counted(self: trio.SocketStream, data: Any) -> None:
        through_trio.append(len(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", counted)
    flaky: list[socket.socket] = []  # the connection whose kernel takes part of a send, or none, at times
    real_send = socket.socket.send

    def send(self: socket.socket, data: Any, *flags: int) -> int:  # (not trio's wake-up socket: never lose one)
        if self not in flaky:
            return real_send(self, data, *flags)
        size, luck = memoryview(data).nbytes, rng.random()
        if luck < 0.2:
            raise BlockingIOError
        if luck < 0.5 and size > 1:
            return real_send(self, memoryview(data)[:size // 2], *flags)
        return real_send(self, data, *flags)

    monkeypatch.setattr(socket.socket, "send", send)
    messages = {w: [rng.randbytes(rng.choice([1, 100, AT_ONCE - 8, AT_ONCE + 1, 300_000])) for _ in range(40)]
                for w in range(3)}

    async def scenario() -> dict[int, list[bytes]]:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        tcp = TrioTCPStream(await trio.open_tcp_stream("127.0.0.1", port))
        server = await listeners[0].accept()
        await tcp.write(b"x" * 100)  # a writer that did not say it waits next (an echo, a relay): send_all
        assert through_trio == [100] and await server.receive_some(100) == b"x" * 100
        AT_ONCE_WRITER.set(True)  # (this task's, and the writers' it starts)
        await tcp.write(b"x" * 100)  # the socket's buffer is empty: no send_all
        assert through_trio == [100] and await server.receive_some(100) == b"x" * 100
        flaky.append(tcp.stream.socket._sock)
        received: dict[int, list[bytes]] = {w: [] for w in messages}

        async def write(w: int) -> None:
            for m in messages[w]:
                await tcp.write(struct.pack(">BI", w, len(m)) + m)
                await trio.sleep(0)

        async def read() -> None:
            buffer = bytearray()
            while True:
                data = await server.receive_some(rng.choice([100, 70_000]))
                if not data:
                    return
                buffer += data
                while len(buffer) >= 5 and len(buffer) >= 5 + (n := struct.unpack(">I", buffer[1:5])[0]):
                    received[buffer[0]].append(bytes(buffer[5:5 + n]))
                    del buffer[:5 + n]
                if rng.random() < 0.1:
                    await trio.sleep(0.005)  # lagging: the socket's buffer fills, direct sends go in part

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                async with trio.open_nursery() as writers:
                    for w in messages:
                        writers.start_soon(write, w)
                await tcp.close()
            assert await tcp.write(b"after close") is None  # py-libp2p's write returns quietly here too
            other = TrioTCPStream(await trio.open_tcp_stream("127.0.0.1", port))
            peer = await listeners[0].accept()
            peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await peer.aclose()  # a reset
            with pytest.raises(ConnectionClosedError):
                for _ in range(100):
                    await other.write(b"y" * 1000)
                    await trio.sleep(0.01)
            await other.close()
            await listeners[0].aclose()
        return received

    assert trio.run(scenario) == messages
    assert any(n > AT_ONCE for n in through_trio)  # big writes went through trio's path
    assert any(n < AT_ONCE for n in through_trio[1:])  # and the rest of small writes the kernel took in part


def test_a_wide_open_lease_stream_takes_megabytes_before_its_reader_reads():
    """yamux_window.open_wide: py-libp2p's window starts at 256 KiB and grows erratically; a lease's is 16 MiB."""
    from p2pexec.transport.yamux_window import open_wide

    size = 8 << 20

    async def scenario() -> int:
        opened, written = trio.Event(), trio.Event()

        async def serve(stream):  # type: ignore[no-untyped-def]
            await open_wide(stream)
            opened.set()
            await written.wait()  # read nothing until the client wrote everything
            got = 0
            while got < size:
                got += len(await stream.read(1 << 20))

        async with Libp2pHost().running() as worker, Libp2pHost().running() as client:
            worker.set_handler(serve)
            stream = await client.open_stream(worker.peer_id, worker.addrs)
            await stream.write(b"x")  # the worker's handler runs once the stream carries something
            await opened.wait()
            with trio.fail_after(20):
                await stream.write(b"y" * (size - 1))  # py-libp2p gives up after 5 s with no window
            written.set()
            return size

    assert trio.run(scenario) == size


def test_a_host_that_stops_hangs_up_on_every_peer_at_once():
    """py-libp2p 0.8.1 pauses 0.1 s twice in closing a connection, after its socket is closed: an executor's
    shutdown waited 0.2 s for each worker it had leased, one after another.  Under trio's mock clock (which
    moves only when every task waits, for a second of real time) the hang-up takes no virtual time, the
    connections are forgotten, and the peers see them end."""

    async def scenario() -> float:
        async def serve(stream):  # type: ignore[no-untyped-def]
            await stream.read(1)

        async with Libp2pHost().running() as worker_a, Libp2pHost().running() as worker_b:
            workers = [worker_a, worker_b]
            async with Libp2pHost().running() as client:
                for worker in workers:
                    worker.set_handler(serve)
                    stream = await client.open_stream(worker.peer_id, worker.addrs)
                    await stream.write(b"x")
                seen = [worker._host.get_network().get_connections(client._host.get_id())[0] for worker in workers]
                stopping = trio.current_time()
            elapsed = trio.current_time() - stopping
            assert not client._host.get_network().connections  # forgotten, as py-libp2p would after its pauses
            with trio.fail_after(30):
                for conn in seen:
                    await conn.muxed_conn.event_closed.wait()  # each worker knows the client is gone
            return elapsed

    elapsed = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=1.0))
    assert elapsed < 0.1, "closing waited for py-libp2p's pauses: see _close_connection in host.py"


def test_connecting_leaves_the_applications_root_logger_alone():
    """py-libp2p 0.8.1 logs each connection through the root logger, which gave it a handler on the first
    one: the application's own ``logging.basicConfig`` then did nothing."""
    script = """
import logging
from p2pexec import LocalCluster
with LocalCluster(workers=1) as lc, lc.executor() as ex:
    assert ex.submit(abs, -1).result(timeout=60) == 1
print(logging.getLogger().handlers)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_verbose_worker_log_has_libp2p_in_it_but_not_every_address_parsed():
    """``-v`` promises libp2p's debug logs; the multiaddr parser's (two hundred lines a connection) drowned them."""
    from p2pexec import LocalCluster

    with LocalCluster(workers=1, verbose=True) as lc:
        with lc.executor() as ex:
            assert ex.submit(abs, -3).result(timeout=60) == 3
        loggers = [line.split()[1] for line in lc.workers[0].log_path.read_text().splitlines()
                   if line[:2].isdigit() and len(line.split()) > 2]
    assert any(name.startswith("libp2p.") for name in loggers) and any(name.startswith("p2pexec.") for name in loggers)
    assert not [name for name in loggers if name.startswith("multiaddr")]


def test_a_fixed_port_in_use_is_refused_though_py_libp2p_listens_with_reuseport():
    """A second relay on a relay's port started silently and took half of its connections."""
    import errno
    import socket

    with socket.socket() as first:  # as py-libp2p's own listener binds
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        with pytest.raises(OSError) as refused:
            Libp2pHost([f"/ip4/127.0.0.1/tcp/{port}"])
        assert refused.value.errno == errno.EADDRINUSE
    Libp2pHost([f"/ip4/127.0.0.1/tcp/{port}"])  # free again (its closed listener does not count)


def test_yamux_frames_are_read_and_written_as_py_libp2p_did_less_what_they_did_for_nothing(monkeypatch):
    """``lean_frames`` stands in for ``Yamux._write_frame`` and shortcuts ``_read_data_body`` and
    ``YamuxStream.write``: if py-libp2p's frame write ever does more than build a debug line, write under
    the lock and checkpoint, its stream write stops spending the send window as it did, or its secure
    session keeps its decrypted bytes differently, this fails (see libp2p_config.py).  Messages of one yamux frame
    and of many come through whole, each frame in one Noise message; with yamux's debug logging on,
    py-libp2p's own write runs, line included."""
    from libp2p.security.secure_session import SecureSession
    from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

    from p2pexec.transport import libp2p_config

    body = inspect.getsource(libp2p_config.ORIGINAL_WRITE_FRAME).split("payload_bytes=", 1)[1]
    assert [line.strip() for line in body.splitlines()[2:]] == [
        "async with self._write_lock:", "await self.secured_conn.write(data)", "await trio.lowlevel.checkpoint()",
    ], "py-libp2p changed Yamux._write_frame: see lean_frames in libp2p_config.py"
    assert "high_watermark" in inspect.getsource(SecureSession._drain), "see lean_frames in libp2p_config.py"
    assert "self.send_window -= to_send" in inspect.getsource(libp2p_config.ORIGINAL_STREAM_WRITE)
    messages = [b"hello", bytes(range(256)) * 1200]  # (300 KiB: five yamux frames)

    async def echo() -> list[bytes | None]:
        async with _framed_echo() as framed:
            got = []
            for message in messages:
                await framed.send(message)
                got.append(await framed.recv())
            return got

    long_way = {"read": 0, "write": 0, "noise messages split": 0}
    read_body, write = libp2p_config.ORIGINAL_READ_DATA_BODY, libp2p_config.ORIGINAL_STREAM_WRITE
    from libp2p.security.noise import io as noise_io

    write_msg = noise_io.BaseNoiseMsgReadWriter.write_msg

    async def counted_write_msg(self, msg, prefix_encoded=False):  # type: ignore[no-untyped-def]
        long_way["noise messages split"] += len(msg) > noise_io.MAX_PLAINTEXT_LENGTH
        await write_msg(self, msg, prefix_encoded)

    monkeypatch.setattr(noise_io.BaseNoiseMsgReadWriter, "write_msg", counted_write_msg)

    async def counted_read(self, length):  # type: ignore[no-untyped-def]
        long_way["read"] += 1
        return await read_body(self, length)

    async def counted_write(self, data):  # type: ignore[no-untyped-def]
        long_way["write"] += 1
        await write(self, data)

    monkeypatch.setattr(libp2p_config, "ORIGINAL_READ_DATA_BODY", counted_read)
    monkeypatch.setattr(libp2p_config, "ORIGINAL_STREAM_WRITE", counted_write)
    yamux_log = logging.getLogger("libp2p.stream_muxer.yamux.yamux")
    level = yamux_log.level
    yamux_log.setLevel(logging.WARNING)  # (another test may have turned debug logging on)
    try:
        assert trio.run(echo) == messages
    finally:
        yamux_log.setLevel(level)
    # each way: the stream's first frame and the big message's (5 frames); every frame one Noise message, so
    # every body is taken at once
    assert 0 < long_way["write"] <= 4 and long_way["read"] == long_way["noise messages split"] == 0, long_way
    assert Yamux._write_frame is libp2p_config._write_frame
    assert Yamux._read_data_body is libp2p_config._read_data_body
    assert YamuxStream.write is libp2p_config._stream_write
    records: list[logging.LogRecord] = []  # (p2pexec keeps py-libp2p's records from the root logger: caplog)
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    yamux_log.addHandler(handler)
    yamux_log.setLevel(logging.DEBUG)
    try:
        assert trio.run(echo) == messages
    finally:
        yamux_log.removeHandler(handler)
        yamux_log.setLevel(level)
    assert any("YAMUX TX" in r.getMessage() for r in records)


def test_a_peer_is_lost_when_a_read_waits_past_the_silence_limit_not_when_nobody_reads():
    """``check_silence`` (a lease's heartbeat calls it) counts only the time a read waits for the peer."""
    from p2pexec.protocol.frames import encode_frame
    from p2pexec.transport.channel import FramedStream, PeerLost

    class Stream:  # a libp2p stream's read and write, fed by hand
        def __init__(self) -> None:
            self.send, self.receive = trio.open_memory_channel[bytes](10)

        async def read(self, n: int) -> bytes:
            return await self.receive.receive()

    async def scenario(clock: trio.testing.MockClock) -> None:
        stream = Stream()
        framed = FramedStream(stream)
        framed.silence_limit = 10
        async with trio.open_nursery() as nursery:
            got: list[bytes | None] = []

            async def read() -> None:
                got.append(await framed.recv())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(9)
            framed.check_silence()  # waited 9 s: not yet
            stream.send.send_nowait(encode_frame(b"hi"))
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"hi"]
            clock.jump(60)
            framed.check_silence()  # a minute without reading: nobody waited for the peer
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(11)
            with pytest.raises(PeerLost, match="sent nothing for 10 s"):
                framed.check_silence()
            nursery.cancel_scope.cancel()

    clock = trio.testing.MockClock()
    trio.run(scenario, clock, clock=clock)


@pytest.mark.parametrize("size,debug", [(100, False), (100_000, False), (100, True)],
                         ids=["small, written at once", "big, through trio", "yamux debug logging on"])
def test_a_write_cancelled_before_it_starts_sends_nothing_and_the_connection_goes_on(size, debug):
    """libp2p_config._write_frame: Eager locks do not check for cancellation, so the frame write does, before
    Noise encrypts: a frame encrypted and then cancelled at the socket would leave the connection's Noise nonce
    ahead of its peer's (every later message undecryptable); one written anyway would arrive unasked."""

    async def scenario() -> list[bytes | None]:
        async with _framed_echo() as framed:
            await framed.send(b"first")
            got = [await framed.recv()]
            with trio.CancelScope() as scope:
                scope.cancel()
                await framed.send(b"x" * size)
            assert scope.cancelled_caught
            await framed.send(b"after")
            with trio.fail_after(10):
                got.append(await framed.recv())
            return got

    yamux_log = logging.getLogger("libp2p.stream_muxer.yamux.yamux")
    level = yamux_log.level
    yamux_log.setLevel(logging.DEBUG if debug else logging.WARNING)  # (py-libp2p's own frame write, or ours)
    try:
        assert trio.run(scenario) == [b"first", b"after"]
    finally:
        yamux_log.setLevel(level)


@contextlib.asynccontextmanager
async def _framed_echo() -> AsyncIterator[Any]:
    """A FramedStream to a second host that sends back every message it gets."""
    from p2pexec.transport.channel import FramedStream

    async with Libp2pHost().running() as server, Libp2pHost().running() as client:
        async def handler(stream):  # type: ignore[no-untyped-def]
            framed = FramedStream(stream)
            while (message := await framed.recv()) is not None:
                await framed.send(message)

        server.set_handler(handler)
        yield FramedStream(await client.open_stream(server.peer_id, server.addrs))
