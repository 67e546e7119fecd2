"""The programs bench_nat.py runs inside NAT-lab namespaces (one process each).

    nat_job.py raw-relay PORT              a relay for anyone (the raw baseline's); prints "relay ADDRESS"
    nat_job.py raw-server RELAY            an echo peer holding a reservation on RELAY; prints "server JSON"
    nat_job.py raw-client SERVER_JSON MIB  echo MIB through the relay, then over the DCUtR direct connection
    nat_job.py p2p-client CONFIG_JSON      a P2PExecutor echoing MIB through its lease, relayed or upgraded

Each client prints one JSON line.  Throughput counts both directions.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import trio

from bench_payload import CHUNK, _read_exactly, echo, sealed_answer, sealed_ask  # the loopback benchmark's pieces


def _identity():
    from nacl.signing import SigningKey

    from p2pexec.keys import Identity

    return Identity("bench", SigningKey.generate())


async def _raw_relay(port: str) -> None:
    from p2pexec.transport.relay import RelayPolicy, running_relay

    async with running_relay(f"/ip4/0.0.0.0/tcp/{port}", RelayPolicy(), lambda user, key: True) as (host, _):
        print(f"relay /ip4/198.51.100.254/tcp/{port}/p2p/{host.peer_id}", flush=True)
        await trio.sleep_forever()


async def _echo(stream) -> None:
    """b"P": echo as it reads (pipelined); b"S" + 8-byte size: read it all, then send it back (a task's way);
    b"E" + size + header: the same, each chunk opened and sealed again as a lease does (what p2pexec adds)."""
    try:
        mode = await _read_exactly(stream, 1)
        if mode == b"E":
            await sealed_answer(stream, int.from_bytes(await _read_exactly(stream, 8), "big"))
            return
        if mode == b"S":
            data = await _read_exactly(stream, int.from_bytes(await _read_exactly(stream, 8), "big"))
            for start in range(0, len(data), CHUNK):
                await stream.write(bytes(data[start:start + CHUNK]))
            return
        while data := await stream.read(CHUNK):
            await stream.write(data)
    except Exception:  # noqa: BLE001 - the client hung up
        pass


async def _raw_server(relay: str) -> None:
    from p2pexec.transport.host import ALL_INTERFACES, Libp2pHost

    async with Libp2pHost([ALL_INTERFACES], nat_traversal=True).running() as host:
        host.set_handler(_echo)
        join = await host.join_relay(relay, _identity(), reserve=lambda j: True)
        print("server " + json.dumps({"peer": host.peer_id, "circuit": join.circuit}), flush=True)
        await trio.sleep_forever()


async def _stored_echo(stream, mib: int) -> float:
    """MB/s of ``mib`` MiB sent, stored by the peer, and sent back: the order a task imposes."""
    block = b"x" * CHUNK
    started = time.perf_counter()
    await stream.write(b"S" + (mib * CHUNK).to_bytes(8, "big"))
    for _ in range(mib):
        await stream.write(block)
    await _read_exactly(stream, mib * CHUNK)
    return 2 * mib * CHUNK / 1e6 / (time.perf_counter() - started)


async def _sealed_echo(stream, mib: int) -> float:
    """:func:`_stored_echo` with every chunk sealed and opened as a lease does, on both sides."""
    started = time.perf_counter()
    await sealed_ask(stream, mib * CHUNK, b"x" * CHUNK, mode=b"E")
    return 2 * mib * CHUNK / 1e6 / (time.perf_counter() - started)


async def _pipelined_echo(stream, mib: int) -> float:
    """MB/s of ``mib`` MiB written while the echo is read back."""
    block = b"x" * CHUNK
    started = time.perf_counter()
    received = 0
    await stream.write(b"P")

    async def read() -> None:
        nonlocal received
        while received < mib * CHUNK:
            received += len(await stream.read(CHUNK))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for _ in range(mib):
            await stream.write(block)
    return 2 * mib * CHUNK / 1e6 / (time.perf_counter() - started)


async def _raw_client(server_json: str, mib: str) -> None:
    from p2pexec.transport.host import ALL_INTERFACES, Libp2pHost

    server = json.loads(server_json)
    relay = server["circuit"].split("/p2p-circuit")[0]
    result: dict[str, object] = {}
    async with Libp2pHost([ALL_INTERFACES], nat_traversal=True).running() as host:
        await host.join_relay(relay, _identity(), reserve=lambda j: False, check_ports=False)
        stream = await host.open_stream(server["peer"], [server["circuit"]])
        result["relayed_path"] = host.stream_path(stream)
        result["relayed_MBps"] = round(await _pipelined_echo(stream, int(mib)), 1)
        stored = await host.open_stream(server["peer"], [server["circuit"]])
        if host.stream_path(stored) == "relayed":
            result["relayed_stored_MBps"] = round(await _stored_echo(stored, int(mib)), 1)
        sealed = await host.open_stream(server["peer"], [server["circuit"]])
        if host.stream_path(sealed) == "relayed":
            result["relayed_sealed_MBps"] = round(await _sealed_echo(sealed, int(mib)), 1)
        host.punch(server["peer"])
        with trio.move_on_after(10):
            await host.wait_direct(server["peer"])
        if host.has_direct(server["peer"]):
            direct = await host.direct_stream(server["peer"])
            result["direct_MBps"] = round(await _pipelined_echo(direct, int(mib)), 1)
            stored = await host.direct_stream(server["peer"])
            result["direct_stored_MBps"] = round(await _stored_echo(stored, int(mib)), 1)
            sealed = await host.direct_stream(server["peer"])
            result["direct_sealed_MBps"] = round(await _sealed_echo(sealed, int(mib)), 1)
        else:
            result["direct_MBps"] = result["direct_stored_MBps"] = result["direct_sealed_MBps"] = None
    print(json.dumps(result), flush=True)


class _Upgraded(logging.Handler):
    """Set when the client logs that its lease moved onto a direct connection."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "moved to a direct connection" in record.getMessage():
            self.event.set()


def _p2p_client(config_json: str) -> None:
    from p2pexec import P2PExecutor

    config = json.loads(config_json)
    upgraded = _Upgraded()
    logger = logging.getLogger("p2pexec.client")
    logger.setLevel(logging.INFO)
    logger.addHandler(upgraded)
    payload = b"x" * (config["mib"] * CHUNK)
    with P2PExecutor(config["cluster"], board=config["board"], identity=config["identity"],
                     members=config["members"], known_hosts=config["known_hosts"], worker_timeout=60) as ex:
        ex.submit(len, b"warm").result(timeout=60)  # a lease, relayed first where the worker sits behind a NAT
        if config["wait_upgrade"] and not upgraded.event.wait(15):
            print(json.dumps({"error": "the lease was not upgraded within 15 s"}), flush=True)
            return
        ex.submit(echo, b"x" * CHUNK).result(timeout=60)  # the task process imported and warm
        started = time.perf_counter()
        assert len(ex.submit(echo, payload).result(timeout=300)) == len(payload)
        elapsed = time.perf_counter() - started
    print(json.dumps({"MBps": round(2 * len(payload) / 1e6 / elapsed, 1), "upgraded": upgraded.event.is_set()}),
          flush=True)


def main(argv: list[str]) -> None:
    mode, *args = argv[1:]
    if mode == "p2p-client":
        _p2p_client(*args)
        return
    trio.run({"raw-relay": _raw_relay, "raw-server": _raw_server, "raw-client": _raw_client}[mode], *args)


if __name__ == "__main__":
    main(sys.argv)
