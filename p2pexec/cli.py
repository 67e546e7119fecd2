"""Command line: ``p2pexec {demo,board}`` and ``p2pexec-worker``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import P2PExecError
from .logs import quiet_dependencies

log = logging.getLogger("p2pexec")


def _setup_logging(verbose: bool, level: int = logging.INFO) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else level,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    quiet_dependencies(verbose)


def _fail(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 1


# -- p2pexec ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2pexec",
        description="Share compute among friends: a concurrent.futures Executor whose workers are "
                    "machines your friends contribute. Python code uses P2PExecutor('owner/cluster'); "
                    "friends run p2pexec-worker --cluster owner/cluster.",
    )
    parser.add_argument("--version", action="version", version=f"p2pexec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a map on a local cluster (embedded board + worker processes)",
                          description="Start an embedded board on 127.0.0.1 and worker processes, run a "
                                      "map through the full path (SSH board, libp2p, encryption), print "
                                      "the results, and exit.")
    demo.add_argument("--workers", type=int, default=2, help="worker processes to start (default: 2)")
    demo.add_argument("--tasks", type=int, default=20, help="items to map (default: 20)")
    demo.add_argument("-v", "--verbose", action="store_true", help="debug logs, libp2p's included")

    board = sub.add_parser("board", help="run a self-hosted, pico-compatible message board (SSH server)",
                           description="Run the message board: an SSH server speaking pico.sh's pipe "
                                       "commands, authenticating users by their SSH public keys.")
    board.add_argument("--listen", default="127.0.0.1:2222", metavar="HOST:PORT",
                       help="address to listen on (default: 127.0.0.1:2222)")
    board.add_argument("--host-key", type=Path, default=None, metavar="FILE",
                       help="SSH host key; generated on first start (default: STATE/host_ed25519)")
    board.add_argument("--users", type=Path, required=True, metavar="FILE",
                       help="users file: 'NAME ssh-ed25519 KEY [comment]' per line")
    board.add_argument("--state", type=Path, default=Path("~/.local/share/p2pexec/board"), metavar="DIR",
                       help="state directory: cluster member lists (default: ~/.local/share/p2pexec/board)")
    board.add_argument("-v", "--verbose", action="store_true", help="debug logs")

    args = parser.parse_args(argv)
    _setup_logging(args.verbose, logging.WARNING if args.command == "demo" else logging.INFO)
    try:
        if args.command == "demo":
            return _demo(args)
        return _board(args)
    except P2PExecError as exc:
        return _fail("p2pexec", exc)
    except KeyboardInterrupt:
        return 130


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.workers < 1 or args.tasks < 1:
        raise P2PExecError("--workers and --tasks must be at least 1")
    print(f"starting an embedded board and {args.workers} worker process(es) on 127.0.0.1 ...", flush=True)
    report = run_demo(workers=args.workers, tasks=args.tasks)
    print(f"map(square, range({args.tasks})) = {report['results']}")
    print(f"workers used: {report['workers_used']} of {args.workers}")
    print(f"cluster start: {report['cluster_start_s']:.2f} s; new executor + map of {args.tasks} tasks: "
          f"{report['map_s'] * 1000:.0f} ms (board handshake, libp2p connections and encryption included)")
    return 0


def _board(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .board.client import fingerprint
    from .board.server import BoardServer, load_or_create_host_key
    from .keys import Keyring

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise P2PExecError(f"--listen {args.listen!r}: expected HOST:PORT")
    state = args.state.expanduser()
    state.mkdir(parents=True, exist_ok=True)
    host_key = load_or_create_host_key((args.host_key or state / "host_ed25519").expanduser())
    server = BoardServer(host=host.strip("[]"), port=int(port), host_key=host_key,
                         users=Keyring.load(args.users), state_dir=state)
    server.start()
    print(f"p2pexec board listening on {host}:{server.port}", flush=True)
    print(f"host key: {host_key.get_name()} {fingerprint(host_key)}")
    print(f"members add it with: ssh-keyscan -p {server.port} {host} >> ~/.ssh/known_hosts")
    print(f"and connect with: --board ssh://USER@{host}:{server.port}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


# -- p2pexec-worker ------------------------------------------------------------------------
def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2pexec-worker",
        description="Contribute this machine's compute to a cluster. Tasks from the cluster's members "
                    "run in separate task processes under your user account; stop with Ctrl-C.",
        epilog="example: p2pexec-worker --cluster alice/friends --slots 4",
    )
    parser.add_argument("--cluster", required=True, metavar="OWNER/NAME", help="the cluster to serve")
    parser.add_argument("--board", default=None, metavar="URL",
                        help="board: ssh://user@host:port (default: $P2PEXEC_BOARD, else pipe.pico.sh)")
    parser.add_argument("--identity", default=None, metavar="KEY",
                        help="your SSH Ed25519 private key (default: $P2PEXEC_IDENTITY, else ~/.ssh/id_ed25519)")
    parser.add_argument("--user", default=None, help="your user name on the board (default: from --board, "
                                                     "else $P2PEXEC_USER, else your login name)")
    parser.add_argument("--members", default=None, metavar="FILE",
                        help="who may send tasks: 'NAME ssh-ed25519 KEY' per line "
                             "(default: ~/.config/p2pexec/clusters/OWNER/NAME.members)")
    parser.add_argument("--slots", type=int, default=1, help="tasks to run at once (default: 1)")
    parser.add_argument("--allow", default=None, metavar="USER,...",
                        help="run tasks only from these members (default: every member)")
    parser.add_argument("--listen", action="append", default=None, metavar="MULTIADDR",
                        help="libp2p listen address (default: /ip4/0.0.0.0/tcp/0); repeatable")
    parser.add_argument("--known-hosts", type=Path, default=Path("~/.ssh/known_hosts"), metavar="FILE",
                        help="known_hosts file to verify the board's host key (default: ~/.ssh/known_hosts)")
    parser.add_argument("--accept-new-host-key", action="store_true",
                        help="trust and remember the board's host key if it is not known yet")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, libp2p's included")
    parser.add_argument("--version", action="version", version=f"p2pexec {__version__}")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.slots < 1:
        parser.error("--slots must be at least 1")
    try:
        return _worker(args)
    except P2PExecError as exc:
        return _fail("p2pexec-worker", exc)


def _worker(args: argparse.Namespace) -> int:
    from .config import resolve
    from .worker.daemon import WorkerConfig, serve

    who = resolve(args.cluster, board=args.board, user=args.user, identity=args.identity, members=args.members)
    allow = frozenset(u.strip() for u in args.allow.split(",") if u.strip()) if args.allow else None
    config = WorkerConfig(who=who, slots=args.slots, listen=tuple(args.listen or ["/ip4/0.0.0.0/tcp/0"]), allow=allow,
                          known_hosts=args.known_hosts.expanduser(), accept_new_host_key=args.accept_new_host_key)

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)

    serve(config, on_ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
