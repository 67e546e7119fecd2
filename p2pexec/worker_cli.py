"""``p2pexec-worker``: lend this machine to a cluster (also ``python -m p2pexec.worker_cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .cli_common import fail, participant_options, setup_logging
from .errors import P2PExecError, first_leaf
from .protocol.matching import REVISION
from .protocol.resources import check_tags, gpu_list

if TYPE_CHECKING:
    from .worker.sandbox import Sandbox


# -- p2pexec-worker ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2pexec-worker", parents=[participant_options()],
        description="Contribute this machine's compute to a cluster. Tasks from the cluster's members run in "
                    "separate task processes, sandboxed where this machine allows (see --check-sandbox). A board "
                    "that cannot be reached yet (not up, or no network) is waited for; stop with Ctrl-C.",
        epilog="example: p2pexec-worker --cluster alice/friends --slots 4",
    )
    parser.add_argument("--cluster", metavar="OWNER/NAME", help="the cluster to serve (required, but with --history)")
    parser.add_argument("--slots", type=int, default=1, help="tasks to run at once (default: 1)")
    parser.add_argument("--allow", default=None, metavar="USER,...",
                        help="run tasks only from these members (default: every member)")
    parser.add_argument("--name", type=_machine_name, default=None, metavar="NAME",
                        help="what members see for this machine in status and their logs, to tell your machines "
                             "apart (default: its host name)")
    parser.add_argument("--lease-seconds", type=float, default=30.0, metavar="S",
                        help="after S seconds a lease yields its slots to another waiting client "
                             "(default: 30)")
    parser.add_argument("--listen", action="append", default=None, metavar="MULTIADDR",
                        help="libp2p listen address (default: /ip4/0.0.0.0/tcp/0); repeatable")
    parser.add_argument("--drain", type=float, default=30.0, metavar="S",
                        help="on Ctrl-C or SIGTERM, take no new work and let running tasks finish for up to S "
                             "seconds (tasks not started go back to their clients); a second signal stops at "
                             "once (default: 30; 0: stop at once)")
    sandbox = parser.add_argument_group("sandbox", "Tasks run in a bubblewrap sandbox where the machine has "
                                                   "it: no access to your files, keys or network, nothing left "
                                                   "running after them.")
    sandbox.add_argument("--check-sandbox", action="store_true", help="print what is enforced here and exit")
    sandbox.add_argument("--no-sandbox", action="store_true",
                         help="run tasks unsandboxed, as your user: they can read your files and keys")
    sandbox.add_argument("--sandbox-layer", choices=("auto", "bubblewrap", "landlock"), default="auto",
                         help="bubblewrap (namespaces, an unprivileged user) where it works, else Landlock "
                              "(default: auto)")
    sandbox.add_argument("--network", action="store_true", help="let tasks use the network")
    sandbox.add_argument("--max-processes", type=_process_cap, default=1024, metavar="N",
                         help="processes and threads a task may have at once, with all it starts (default 1024, "
                              "up to 300 more early on; 0: no cap; needs bubblewrap on Linux 6.14+)")
    lend = parser.add_argument_group("what you lend", "Advertised on the board; tasks that ask for memory, cores, "
                                                      "GPUs or tags (ex.options(...)) only come if they fit.")
    lend.add_argument("--memory", type=_size, default=None, metavar="SIZE",
                      help="memory tasks may use in all, e.g. 8GiB: a task gets what it asked for, else a slot's "
                           "share, and is stopped past it (default: this machine's memory, tasks that ask for "
                           "nothing not held to a share)")
    lend.add_argument("--gpus", default="all", metavar="all|none|0,1",
                      help="GPUs to share, dealt between the slots; each task process sees only its slot's "
                           "(default: all that nvidia-ml-py finds; none without it)")
    lend.add_argument("--tag", action="append", default=[], metavar="NAME",
                      help="a label tasks can ask for, e.g. --tag big-disk; repeatable")
    lend.add_argument("--cache-size", type=_size_or_zero, default=None, metavar="SIZE",
                      help="memory for big task arguments (1 MiB or more: arrays, bytes, big closures), kept so "
                           "that each crosses the network once per client, e.g. 2GiB: least recently used out "
                           "first, per member (no member can use another's); a member's are dropped 60-90 s after "
                           "their last lease ended, or at once when they are removed from the cluster; 0 turns it "
                           "off (default: 1 GiB, at most a quarter of --memory or of this machine's memory)")
    history = parser.add_argument_group("history", "Workers record what ran (member, function, start, duration, "
                                                   "outcome) in $XDG_STATE_HOME/p2pexec/worker-history.jsonl "
                                                   "(default ~/.local/state/...), trimmed to about 1 MiB.")
    history.add_argument("--history", nargs="?", type=int, const=20, default=None, metavar="N",
                         help="print the N most recent tasks (default 20) and exit")
    history.add_argument("--json", action="store_true", help="with --history: one JSON object per line")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID", help=argparse.SUPPRESS)
    parser.add_argument("--remove-with-parent", type=Path, default=None, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"p2pexec {__version__} (wire revision {REVISION})")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.slots < 1:
        parser.error("--slots must be at least 1")
    from .worker.gpus import detect as detect_gpus

    try:
        args.tags = check_tags(args.tag)
        args.gpus_shared = gpu_list(args.gpus, detect_gpus() if args.gpus.strip().lower() == "all" else ())
    except ValueError as exc:
        parser.error(str(exc))
    if not args.drain >= 0:
        parser.error("--drain must be 0 or more seconds")
    if args.check_sandbox:
        for line in _sandbox(args).describe():
            print(line)
        return 0
    if args.history is not None:
        return _history(args.history, args.json)
    if not args.cluster:
        parser.error("--cluster OWNER/NAME is required")
    try:
        return _worker(args)
    except P2PExecError as exc:
        return fail("p2pexec-worker", exc)
    except BaseExceptionGroup as group:  # from the daemon's task groups: say the cause, in one line
        matched, _ = group.split(P2PExecError)
        if matched is None:
            raise
        return fail("p2pexec-worker", first_leaf(matched))


def _size(text: str) -> int:
    """``8GiB``, ``512MiB``, ``2G``, ``1048576``: bytes."""
    from .protocol.resources import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _machine_name(text: str) -> str:
    from .protocol.messages import MACHINE_NAME_RULE, machine_name

    if not machine_name(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a machine name is {MACHINE_NAME_RULE}")
    return text


def _size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _size(text)


def _cache_size(given: int | None, memory: int | None) -> int:
    """--cache-size, else 1 GiB, but at most a quarter of what the worker lends."""
    if given is not None:
        return given
    from .config import physical_memory
    from .worker.daemon import DEFAULT_CACHE_SIZE

    lent = memory or physical_memory()
    return min(DEFAULT_CACHE_SIZE, lent // 4) if lent else DEFAULT_CACHE_SIZE


def _sandbox(args: argparse.Namespace) -> "Sandbox":
    from .worker.sandbox import detect

    from .config import physical_memory

    sandbox = detect(network=args.network, memory=args.memory or physical_memory(), enabled=not args.no_sandbox,
                     layer=args.sandbox_layer, processes=args.max_processes or None)
    return dataclasses.replace(sandbox, gpus=bool(args.gpus_shared))


def _process_cap(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes") from None
    if value < 0 or 0 < value < 16:
        raise argparse.ArgumentTypeError(f"{value} is too few: a task needs room for its threads; "
                                         f"use at least 16, or 0 for no cap")
    return value


def _history(count: int, as_json: bool) -> int:
    """What ran on this machine's workers, newest last; the function names are what members reported."""
    from .worker.history import History, default_path, format_table

    entries = History(default_path()).recent(max(0, count))
    if as_json:
        for entry in entries:
            sys.stdout.write(entry.to_line().decode())
    else:
        print(format_table(entries))
        print(f"({default_path()}; function names are what the members' tasks reported)")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .config import resolve
    from .protocol.messages import host_machine_name
    from .worker.daemon import WorkerConfig, serve

    who = resolve(args.cluster, board=args.board, user=args.user, identity=args.identity, members=args.members,
                  relay=args.relay)
    allow = frozenset(u.strip() for u in args.allow.split(",") if u.strip()) if args.allow else None
    config = WorkerConfig(who=who, slots=args.slots, lease_seconds=args.lease_seconds,
                          listen=tuple(args.listen or ["/ip4/0.0.0.0/tcp/0"]), allow=allow,
                          known_hosts=args.known_hosts.expanduser(), accept_new_host_key=args.accept_new_host_key,
                          relays=who.relays, sandbox=_sandbox(args), memory=args.memory, gpus=args.gpus_shared,
                          tags=args.tags, cache_size=_cache_size(args.cache_size, args.memory),
                          name=args.name or host_machine_name(socket.gethostname()))

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)

    serve(config, on_ready=ready, drain=args.drain, parent=args.exit_with_parent,
          leftovers=args.remove_with_parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
