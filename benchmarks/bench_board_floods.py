"""A `p2pexec board` process under the floods of issue 15: its memory (RSS) and CPU, idle and under each.

    python benchmarks/bench_board_floods.py [--seconds 12] [--code DIR] [--json results.json]

Floods, each from its own loopback addresses (127.0.0.2 ...), for
``--seconds`` each: silent sockets re-opened as fast as the board closes
them; sockets that finish the SSH key exchange and never log in; one user
creating access lists as fast as the board answers.  Meanwhile a member
publishes a line each second and the round trip is timed.  ``--code DIR``
runs the board from another checkout (say, main's) for a baseline.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paramiko
from _common import write_json

from p2pexec.keys import generate_identity_file

TICK = os.sysconf("SC_CLK_TCK")


def usage(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of ``pid``."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss / 1024, (int(fields[11]) + int(fields[12])) / TICK


class Board:
    def __init__(self, tmp: Path, code: str | None) -> None:
        self.keys = tmp / "keys"
        self.keys.mkdir()
        for user in ("alice", "bob"):
            generate_identity_file(self.keys / user, comment=user)
        (tmp / "users.txt").write_text("".join(f"{u} {(self.keys / f'{u}.pub').read_text()}" for u in ("alice", "bob")))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=code or str(Path(__file__).resolve().parents[1]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pexec.cli", "board", "--listen", f"127.0.0.1:{self.port}",
             "--users", str(tmp / "users.txt"), "--state", str(tmp / "state"), "--no-relay",
             "--max-connections", "100"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                threading.Event().wait(0.1)
        raise RuntimeError("the board did not start")

    def client(self, user: str) -> paramiko.SSHClient:
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect("127.0.0.1", self.port, username=user, key_filename=str(self.keys / user),
                  look_for_keys=False, allow_agent=False, timeout=10, banner_timeout=10, auth_timeout=10)
        return c

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def member_latency(board: Board, stop: threading.Event, out: list[float]) -> None:
    """A member publishes a line a second on a fresh connection; seconds until the sub saw it (or 30 failed)."""
    sub = board.client("alice")
    chan = sub.get_transport().open_session()  # type: ignore[union-attr]
    chan.exec_command("sub -k t")
    chan.settimeout(30)
    n = 0
    while not stop.wait(1.0) and n < 60:
        n += 1
        started = time.monotonic()
        try:
            pub = board.client("alice")
            p = pub.get_transport().open_session()  # type: ignore[union-attr]
            p.exec_command("pub -b=false t")
            p.sendall(b"x%d\n" % n)
            p.shutdown_write()
            got = b""
            while not got.endswith(b"x%d\n" % n):
                got += chan.recv(100)
            out.append(time.monotonic() - started)
            pub.close()
        except Exception:
            out.append(30.0)
    sub.close()


def silent(board: Board, stop: threading.Event) -> None:
    held: list[socket.socket] = []
    i = 0
    while not stop.is_set() and i < 200_000:
        i += 1
        try:
            held.append(socket.create_connection(("127.0.0.1", board.port), timeout=2,
                                                 source_address=(f"127.0.0.{2 + i % 3}", 0)))
        except OSError:
            pass
        if len(held) >= 302:
            for s in held[:100]:
                s.close()
            del held[:100]
    for s in held:
        s.close()


def handshakes(board: Board, stop: threading.Event) -> None:
    held: list[paramiko.Transport] = []
    i = 0
    while not stop.is_set() and i < 20_000:
        i += 1
        try:
            sock = socket.create_connection(("127.0.0.1", board.port), timeout=2,
                                            source_address=(f"127.0.0.{5 + i % 3}", 0))
            t = paramiko.Transport(sock)
            t.start_client(timeout=5)
            held.append(t)
        except Exception:
            pass
        held = [t for t in held if t.is_active()]
    for t in held:
        t.close()


def access_lists(board: Board, stop: threading.Event) -> None:
    c = board.client("bob")
    i = 0
    while not stop.is_set() and i < 5000:
        i += 1
        try:
            ch = c.get_transport().open_session()  # type: ignore[union-attr]
            ch.exec_command(f"pub -b=false c{i} -a alice")
            ch.shutdown_write()
            ch.recv_exit_status()
        except Exception:
            c.close()
            c = board.client("bob")
    c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--code", help="run the board from this checkout (a baseline)")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # the attackers' failed handshakes are the point
    results = {}
    for name, flood in (("silent sockets", silent), ("handshakes, no login", handshakes),
                        ("access lists", access_lists)):
        with tempfile.TemporaryDirectory() as tmp:
            board = Board(Path(tmp), args.code)
            try:
                rss0, cpu0 = usage(board.proc.pid)
                stop, latencies = threading.Event(), []
                threads = [threading.Thread(target=flood, args=(board, stop)),
                           threading.Thread(target=member_latency, args=(board, stop, latencies))]
                for t in threads:
                    t.start()
                stop.wait(args.seconds)
                rss1, cpu1 = usage(board.proc.pid)
                stop.set()
                for t in threads:
                    t.join(60)
                lists = Path(tmp, "state", "clusters.json")
                saved = lists.read_text().count('"bob/') if lists.exists() else 0
            finally:
                board.stop()
        row = {"rss_idle_mib": rss0, "rss_flood_mib": rss1, "cpu_share": (cpu1 - cpu0) / args.seconds,
               "member_worst_s": max(latencies, default=None), "member_tries": len(latencies),
               "member_failed": sum(1 for x in latencies if x >= 30), "lists_saved": saved}
        results[name] = row
        print(f"{name:22} RSS {rss0:5.1f} -> {rss1:5.1f} MiB, CPU {row['cpu_share']:4.0%} of a core, "
              f"member round trip worst {row['member_worst_s'] or 0:.2f} s "
              f"({row['member_failed']}/{row['member_tries']} failed)"
              + (f", access lists kept {saved}" if name == "access lists" else ""))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
