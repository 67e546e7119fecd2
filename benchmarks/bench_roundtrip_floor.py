"""A lone task's round trip beside what py-libp2p alone costs: where the 3x-loky target stands.

Measures, in turns (so a busy moment hits all of them), the median round
trip of:

- ``loky`` (2 workers), the target's baseline;
- a raw py-libp2p ping-pong of a 180-byte message over one stream (our
  ``Libp2pHost``: Noise, yamux), its echo server in another process;
- the same through ``SecureChannel`` (framing and sealing both ways);
- ``P2PExecutor.submit(noop).result()`` on 2 local workers of 1 slot;

with the CPU each process (and the client's loop thread) spends per round
trip.  The difference between the last two is what p2pexec's own shape
costs: the daemon's hop to a task process, the hand-offs between your
thread and the loop thread, pickling, bookkeeping.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

import trio
from _common import serve_on_libp2p, verdict, write_json
from bench_executor import warm_roundtrip_ms

MESSAGE = b"x" * 180
KEYS = b"a" * 32, b"b" * 32  # fixed: the server is spawned and imports this module anew


def _stat(path: str) -> list[str]:
    """The fields of a ``/proc`` stat file after the command name (state, parent, ...)."""
    with open(path) as f:
        return f.read().rpartition(")")[2].split()


def _cpu(pid: int, tid: int | None = None) -> float:
    """Seconds of CPU (user + system) of a process, or of one of its threads."""
    fields = _stat(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _echo_server(conn: Any, sealed: bool) -> None:
    from p2pexec.transport.channel import FramedStream, SecureChannel

    async def handler(stream: Any) -> None:
        try:
            if sealed:
                channel = await SecureChannel.establish(FramedStream(stream), *KEYS)
                while (message := await channel.recv()) is not None:
                    await channel.send(bytes(message))
            else:
                while data := await stream.read(65536):
                    await stream.write(data)
        except Exception:  # noqa: BLE001 - the client went away: this round is over
            pass

    serve_on_libp2p(conn, handler)


def ping_pong(n: int, sealed: bool) -> dict[str, float]:
    """Median round trip (ms) of ``n`` ping-pongs, and CPU (µs) per round trip at each end."""
    from p2pexec.transport.channel import FramedStream, SecureChannel
    from p2pexec.transport.host import Libp2pHost

    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_echo_server, args=(child, sealed))
    server.start()
    peer, addrs = parent.recv()

    async def main() -> dict[str, float]:
        async with Libp2pHost().running() as host:
            stream = await host.open_stream(peer, addrs)
            if sealed:
                channel = await SecureChannel.establish(FramedStream(stream), *reversed(KEYS))
                send, receive = channel.send, channel.recv
            else:
                send, receive = stream.write, lambda: stream.read(65536)
            for _ in range(200):
                await send(MESSAGE)
                await receive()
            times, cpu = [], (_cpu(os.getpid()), _cpu(server.pid))
            for _ in range(n):
                started = time.perf_counter()
                await send(MESSAGE)
                await receive()
                times.append(time.perf_counter() - started)
            return {"ms": statistics.median(times) * 1e3,
                    "client_cpu_us": (_cpu(os.getpid()) - cpu[0]) / n * 1e6,
                    "server_cpu_us": (_cpu(server.pid) - cpu[1]) / n * 1e6}

    try:
        return trio.run(main)
    finally:
        parent.send("stop")
        server.join(10)


def loky_round_trip(n: int) -> float:
    from loky import get_reusable_executor

    ex = get_reusable_executor(2)
    warm_roundtrip_ms(ex, 200)
    return warm_roundtrip_ms(ex, n)


def p2pexec_round_trip(n: int) -> dict[str, float]:
    """Median round trip (ms), and CPU (µs) per round trip of each process that worked and of the client's
    loop thread."""
    import threading

    from p2pexec import LocalCluster

    with LocalCluster(workers=2, slots=1) as lc, lc.executor() as ex:
        warm_roundtrip_ms(ex, 300)
        loop = next(t.native_id for t in threading.enumerate() if t.name.startswith("p2pexec-client"))
        daemons = [w.pid for w in lc.workers]  # (not every child: loky's idle workers may end meanwhile)
        workers = {pid: _cpu(pid) for pid in daemons}
        tasks = {pid: _cpu(pid) for w in daemons for pid in _children(w)}
        me, loop_cpu = _cpu(os.getpid()), _cpu(os.getpid(), loop)
        result = {"ms": warm_roundtrip_ms(ex, n)}
        result["client_cpu_us"] = (_cpu(os.getpid()) - me) / n * 1e6
        result["client_loop_thread_cpu_us"] = (_cpu(os.getpid(), loop) - loop_cpu) / n * 1e6
        result["daemon_cpu_us"] = max(_cpu(pid) - before for pid, before in workers.items()) / n * 1e6
        result["task_process_cpu_us"] = max(_cpu(pid) - before for pid, before in tasks.items()) / n * 1e6
        return result


def _parent(pid: int) -> int:
    try:
        return int(_stat(f"/proc/{pid}/stat")[1])
    except OSError:  # (it ended meanwhile)
        return -1


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roundtrips", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every path once")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not os.path.exists("/proc/self/stat"):
        print("needs /proc (Linux) for CPU per process")
        return 0
    if importlib.util.find_spec("loky") is None:
        print("loky, the target's baseline, is not installed: pip install 'p2pexec[bench]'")
        return 0
    rounds: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        rounds.append({"loky_ms": loky_round_trip(args.roundtrips),
                       "raw": ping_pong(args.roundtrips, sealed=False),
                       "sealed": ping_pong(args.roundtrips, sealed=True),
                       "p2pexec": p2pexec_round_trip(args.roundtrips)})
    print(f"round trips, median of {args.roundtrips} in each of {args.rounds} rounds taken in turns")
    for name, key in (("loky(2)", None), ("raw py-libp2p ping-pong", "raw"),
                      ("the same through SecureChannel", "sealed"), ("P2PExecutor submit(noop)", "p2pexec")):
        line = "  ".join(f"{(r['loky_ms'] if key is None else r[key]['ms']):6.3f}" for r in rounds)
        print(f"  {name:32} {line}  ms")
    for r in rounds:
        raw, sealed, ours = r["raw"], r["sealed"], r["p2pexec"]
        print(f"  CPU per round trip (µs): raw ends {raw['client_cpu_us']:.0f}/{raw['server_cpu_us']:.0f}, "
              f"SecureChannel ends {sealed['client_cpu_us']:.0f}/{sealed['server_cpu_us']:.0f}; p2pexec: client "
              f"{ours['client_cpu_us']:.0f} (loop thread {ours['client_loop_thread_cpu_us']:.0f}), daemon "
              f"{ours['daemon_cpu_us']:.0f}, task process {ours['task_process_cpu_us']:.0f}")
    floor = statistics.median(r["raw"]["ms"] / r["loky_ms"] for r in rounds)
    ours = statistics.median(r["p2pexec"]["ms"] / r["loky_ms"] for r in rounds)
    print(f"  py-libp2p alone: {floor:.1f}x loky; P2PExecutor: {ours:.1f}x loky")
    print(f"issue 16, warm round trip <= 3x loky: {ours:.1f}x: {verdict(ours <= 3)}")
    write_json(args.json, {"roundtrips": args.roundtrips, "rounds": rounds, "raw_x_loky": floor,
                           "p2pexec_x_loky": ours})
    return 0


if __name__ == "__main__":
    sys.exit(main())
