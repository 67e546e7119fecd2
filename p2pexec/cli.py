"""Command line: ``p2pexec`` (demo, board, relay, invite, join, status, ...).

``p2pexec-worker`` is :mod:`.worker_cli`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import __version__
from .errors import P2PExecError
from .cli_common import fail, participant_options, setup_logging
from .protocol.matching import REVISION

if TYPE_CHECKING:
    from .config import Participant
    from .transport.relay import RelayPolicy

log = logging.getLogger("p2pexec")


DEFAULT_RELAY_PORT = 4001


def _relay_options(group: argparse._ActionsContainer) -> None:
    """Per-member relay limits, shared by ``p2pexec board`` and ``p2pexec relay``."""
    group.add_argument("--relay-announce", action="append", default=None, metavar="ADDRESS",
                       help="the relay address members are told, HOST:PORT or /ip4/HOST/tcp/PORT, repeatable "
                            "(default: the address they reached the board on; for p2pexec relay, this host's "
                            "addresses); for port forwarding")
    group.add_argument("--relay-reservations", type=int, default=8, metavar="N",
                       help="reservations each member may hold (default: 8)")
    group.add_argument("--relay-circuits", type=int, default=64, metavar="N",
                       help="relayed connections each member may have open (default: 64)")
    group.add_argument("--relay-circuit-gib", type=float, default=16.0, metavar="GIB",
                       help="bytes one relayed connection may carry, both ways, in GiB (default: 16)")
    group.add_argument("--relay-circuit-hours", type=float, default=24.0, metavar="H",
                       help="how long one relayed connection may last (default: 24)")


def _relay_policy(args: argparse.Namespace) -> "RelayPolicy":
    from .transport.relay import RelayPolicy

    if min(args.relay_reservations, args.relay_circuits) < 1 or min(args.relay_circuit_gib,
                                                                     args.relay_circuit_hours) <= 0:
        raise P2PExecError("relay limits must be positive")
    return RelayPolicy(reservations_per_member=args.relay_reservations, circuits_per_member=args.relay_circuits,
                       circuit_bytes=int(args.relay_circuit_gib * (1 << 30)),
                       circuit_seconds=max(1, int(args.relay_circuit_hours * 3600)))


def _announced(args: argparse.Namespace, peer_id: str) -> list[str]:
    """``--relay-announce`` addresses as full relay multiaddrs."""
    return [f"{a if a.startswith('/') else _tcp_multiaddr(a, '--relay-announce')}/p2p/{peer_id}"
            for a in args.relay_announce or ()]


def _tcp_multiaddr(text: str, option: str) -> str:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise P2PExecError(f"{option} {text!r}: expected HOST:PORT")
    return f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{port}"


# -- p2pexec ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2pexec",
        description="Share compute among friends: a concurrent.futures Executor whose workers are "
                    "machines your friends contribute. Python code uses P2PExecutor('owner/cluster'); "
                    "friends run p2pexec-worker --cluster owner/cluster.",
    )
    parser.add_argument("--version", action="version", version=f"p2pexec {__version__} (wire revision {REVISION})")
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
    board.add_argument("--state", type=Path, default=None, metavar="DIR",
                       help="state directory: host key, relay key and cluster member lists "
                            "(default: $XDG_DATA_HOME/p2pexec/board, i.e. ~/.local/share/p2pexec/board)")
    board.add_argument("--max-line", type=int, default=65536, metavar="BYTES",
                       help="longest line a session may send (default: 65536)")
    board.add_argument("--lines-per-second", type=float, default=200.0, metavar="N",
                       help="lines per second a session may send (default: 200)")
    board.add_argument("--sessions-per-user", type=int, default=32, metavar="N",
                       help="concurrent sessions per user (default: 32)")
    board.add_argument("--topics-per-user", type=int, default=100, metavar="N",
                       help="topics one user may own, live or with an access list (which the board keeps); "
                            "public ones aside (default: 100)")
    admission = board.add_argument_group(
        "connections", "Limits on TCP connections, so that strangers without a key, from one address or a few, "
                       "cannot crowd out members. A source is an IPv4 address or an IPv6 /64.")
    admission.add_argument("--max-connections", type=int, default=512, metavar="N",
                           help="concurrent connections in all (default: 512)")
    admission.add_argument("--max-unauthenticated", type=int, default=None, metavar="N",
                           help="of those, connections not logged in yet; the rest is kept for members "
                                "(default: three quarters of --max-connections)")
    admission.add_argument("--connections-per-source", type=int, default=128, metavar="N",
                           help="connections from one source, logged in or not (default: 128)")
    admission.add_argument("--unauthenticated-per-source", type=int, default=16, metavar="N",
                           help="connections from one source not logged in yet (default: 16)")
    admission.add_argument("--handshakes-per-source", type=int, default=8, metavar="N",
                           help="connections from one source still exchanging SSH keys (default: 8)")
    admission.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                           help="time from connecting to the end of the SSH key exchange (default: 10)")
    admission.add_argument("--auth-timeout", type=float, default=20.0, metavar="SECONDS",
                           help="time from connecting to logging in (default: 20)")
    relay_limits = board.add_argument_group(
        "relay", "The board also runs a libp2p circuit relay, so that members behind home routers reach each "
                 "other (relayed, then hole-punched to a direct connection where the routers allow). Members "
                 "learn its address from the board; only users of this board may use it.")
    relay_limits.add_argument("--relay-listen", default=None, metavar="HOST:PORT",
                       help=f"where the relay listens (default: the board's host, port {DEFAULT_RELAY_PORT})")
    relay_limits.add_argument("--no-relay", action="store_true", help="run no relay")
    _relay_options(relay_limits)
    board.add_argument("-v", "--verbose", action="store_true", help="debug logs")

    common = participant_options()

    host = sub.add_parser("host", parents=[common], help="set who may join your cluster (owner only)",
                          description="Set the member list of your cluster OWNER/NAME on the board. On a "
                                      "p2pexec board the list is kept by the board; on pico.sh it lasts only "
                                      "while a session holds the topic, so use --keep there.")
    host.add_argument("cluster", metavar="OWNER/NAME")
    host.add_argument("--users", required=True, metavar="USER,...", help="members besides you")
    host.add_argument("--keep", action="store_true", help="hold the topic open until Ctrl-C (pico.sh)")

    invite = sub.add_parser("invite", parents=[common], help="invite a friend to your cluster (owner only)",
                            description="Put FRIEND on the signed member list of your cluster OWNER/NAME and print "
                                        "a one-time code (the last line) for them: they run 'p2pexec join CODE'. "
                                        "The code is valid once, for 7 days; send it privately.")
    invite.add_argument("cluster", metavar="OWNER/NAME")
    invite.add_argument("friend", metavar="FRIEND", help="the name your friend will have on the board")
    join = sub.add_parser("join", help="join a cluster with the code its owner sent you",
                          description="Register your SSH key with the cluster's board, record the board's host "
                                      "key, and save the cluster: then 'p2pexec-worker --cluster OWNER/NAME' and "
                                      "P2PExecutor('OWNER/NAME') work with no other option. Uses --identity, else "
                                      "p2pexec's own key (created the first time, and said where), not your "
                                      "everyday ~/.ssh/id_ed25519.")
    join.add_argument("code", metavar="CODE")
    join.add_argument("--identity", default=None, metavar="KEY", help="the SSH Ed25519 key to join with")
    join.add_argument("--known-hosts", type=Path, default=Path("~/.ssh/known_hosts"), metavar="FILE",
                      help="where to record the board's host key (default: ~/.ssh/known_hosts)")
    join.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    remove = sub.add_parser("remove", parents=[common], help="take a member out of your cluster (owner only)",
                            description="Sign a member list without FRIEND: the board and every member online "
                                        "stop working with them within seconds.")
    remove.add_argument("cluster", metavar="OWNER/NAME")
    remove.add_argument("friend", metavar="FRIEND")

    status = sub.add_parser("status", parents=[common], help="show the workers and clients on a cluster, "
                                                           "once or live (--watch)",
                            description="Join the cluster's board as an observer and list the workers (slots, "
                                        "busy slots, cores, memory, Python, reachability) and clients (queued, "
                                        "running, done and failed tasks) that answer.")
    status.add_argument("cluster", metavar="OWNER/NAME")
    status.add_argument("--wait", type=float, default=2.0, metavar="SECONDS",
                        help="how long to collect answers (default: 2)")
    status.add_argument("--json", action="store_true",
                        help="machine-readable output (with --watch: one JSON object per line)")
    status.add_argument("--watch", action="store_true",
                        help="a live view, refreshed every second, until Ctrl-C (or --for)")
    status.add_argument("--for", dest="watch_for", type=float, default=None, metavar="SECONDS",
                        help="with --watch: stop after SECONDS")

    relay = sub.add_parser(
        "relay", parents=[common], help="run a libp2p relay for members behind NATs (pico.sh boards, other hosts)",
        description="Run a circuit relay that only members may use, so that friends behind home routers reach "
                    "each other. p2pexec board runs one already; use this for a cluster on pico.sh, or to put the "
                    "relay on another host. With OWNER/NAME (run by the owner, with the owner's key) the relay's "
                    "address is announced, signed, on the cluster's board, so members need no configuration; "
                    "otherwise give members the printed address (--relay or P2PEXEC_RELAY).")
    relay.add_argument("cluster", nargs="?", metavar="OWNER/NAME",
                       help="announce the relay on this cluster's board (you must be its owner)")
    relay.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_RELAY_PORT}", metavar="HOST:PORT",
                       help=f"where the relay listens (default: 0.0.0.0:{DEFAULT_RELAY_PORT})")
    relay.add_argument("--key", type=Path, default=None, metavar="FILE",
                       help="the relay's key (made on first use): its address stays the same across restarts "
                            "(default: $XDG_DATA_HOME/p2pexec/relay_ed25519, i.e. ~/.local/share/p2pexec/...)")
    _relay_options(relay)

    args = parser.parse_args(argv)
    setup_logging(args.verbose, logging.WARNING if args.command == "demo" else logging.INFO)
    try:
        return {"demo": _demo, "board": _board, "host": _host, "status": _status, "relay": _relay,
                "invite": _invite, "join": _join, "remove": _remove}[args.command](args)
    except P2PExecError as exc:
        return fail("p2pexec", exc)
    except KeyboardInterrupt:
        return 130


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.workers < 1 or args.tasks < 1:
        raise P2PExecError("--workers and --tasks must be at least 1")
    print(f"starting an embedded board and {args.workers} worker process(es) on 127.0.0.1 ...", flush=True)
    report = run_demo(workers=args.workers, tasks=args.tasks, progress=_Progress(sys.stderr))
    print(f"map(square, range({args.tasks})) = {report['results']}")
    print(f"workers used: {report['workers_used']} of {args.workers}")
    print(f"cluster start: {report['cluster_start_s']:.2f} s; new executor + map of {args.tasks} tasks: "
          f"{report['map_s'] * 1000:.0f} ms (board handshake, libp2p connections and encryption included)")
    return 0


class _Progress:
    """Results so far and their rate, on stderr: one line redrawn on a terminal, a line a second elsewhere."""

    EVERY = 1.0

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._shown_at = -math.inf

    def __call__(self, done: int, total: int, seconds: float) -> None:
        last = done == total
        if not (self.tty or last or seconds - self._shown_at >= self.EVERY):
            return
        self._shown_at = seconds
        line = f"{done}/{total} done, {done / max(seconds, 1e-9):.1f} tasks/s"
        if self.tty:
            self.stream.write(f"\r{line}" + ("\n" if last else ""))
        else:
            self.stream.write(f"progress: {line}\n")
        self.stream.flush()


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser()


def _board(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .board.admission import Limits
    from .board.client import fingerprint
    from .board.server import BoardServer, UsersFileWatcher, dedicate_process, load_or_create_host_key
    from .keys import Keyring

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise P2PExecError(f"--listen {args.listen!r}: expected HOST:PORT")
    state = (args.state or _data_home() / "p2pexec" / "board").expanduser()
    state.mkdir(parents=True, exist_ok=True)
    host_key = load_or_create_host_key((args.host_key or state / "host_ed25519").expanduser())
    users_path = args.users.expanduser()
    try:
        limits = Limits(max_connections=args.max_connections, max_unauthenticated=args.max_unauthenticated,
                        connections_per_source=args.connections_per_source,
                        unauthenticated_per_source=args.unauthenticated_per_source,
                        handshakes_per_source=args.handshakes_per_source,
                        handshake_timeout=args.handshake_timeout, auth_timeout=args.auth_timeout)
        server = BoardServer(host=host.strip("[]"), port=int(port), host_key=host_key,
                             users=Keyring.load(users_path), state_dir=state, max_line=args.max_line,
                             lines_per_second=args.lines_per_second, sessions_per_user=args.sessions_per_user,
                             topics_per_user=args.topics_per_user, limits=limits)
    except ValueError as exc:
        raise P2PExecError(str(exc)) from None
    relay = None
    if not args.no_relay:
        from .board.server import RelayAddress
        from .transport.relay import RelayService, relay_seed

        listen = _tcp_multiaddr(args.relay_listen or f"{host}:{DEFAULT_RELAY_PORT}", "--relay-listen")
        try:
            relay = RelayService(listen, _relay_policy(args), server.knows, relay_seed(state / "relay_ed25519"))
        except OSError as exc:
            raise P2PExecError(f"the relay cannot listen on {listen}: {exc.strerror}; pick another port with "
                               f"--relay-listen, or run none with --no-relay") from None
        server.relay = RelayAddress(relay.peer_id, relay.port, tuple(_announced(args, relay.peer_id)))
    watcher = UsersFileWatcher(server, users_path)
    dedicate_process()
    try:
        server.start()
    except OSError as exc:
        if relay is not None:
            relay.stop()
        raise P2PExecError(f"cannot listen on {args.listen}: {exc.strerror}") from None
    watcher.start()
    shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    print(f"p2pexec board listening on {shown}:{server.port}; users from {users_path} (re-read on change "
          f"or SIGHUP); state in {state}", flush=True)
    print(f"host key: {host_key.get_name()} {fingerprint(host_key)}")
    print(f"members check it and add it with: ssh-keyscan -p {server.port} {host} >> ~/.ssh/known_hosts")
    print(f"then connect with: --board ssh://USER@{shown}:{server.port}", flush=True)
    if relay is not None:
        print(f"relay listening on port {relay.port} (peer {relay.peer_id}); members learn its address "
              f"from the board", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if hasattr(signal, "SIGHUP"):  # not on Windows, where the users file is still re-read on change
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=watcher.reload, daemon=True).start())
    # A signal that lands on another thread (likely with a flood's hundreds) does not wake
    # a wait without a timeout; its handler runs once this one returns.
    while not stop.wait(1.0):
        pass
    watcher.stop()
    server.stop()
    if relay is not None:
        relay.stop()
    return 0


def _relay(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .board.announce import RelayAnnouncer
    from .config import default_members_path, resolve
    from .keys import WatchedKeyring
    from .protocol.reach import scope, split_tcp
    from .transport.relay import RelayService, relay_seed

    who = None
    if args.cluster:
        who = resolve(args.cluster, board=args.board, user=args.user, identity=args.identity,
                      members=args.members)
        owner = who.cluster.split("/", 1)[0]
        if who.identity.user != owner:
            raise P2PExecError(f"only the owner {owner!r} can announce a relay for {who.cluster}; you are "
                               f"{who.identity.user!r} (pass --user {owner} with the owner's key, or run without "
                               f"OWNER/NAME and give members the address)")
    if not args.members and not args.cluster:
        raise P2PExecError("say who may use the relay: --members FILE ('NAME ssh-ed25519 KEY' per line), "
                           "or OWNER/NAME to use that cluster's members file")
    members = WatchedKeyring(args.members or default_members_path(args.cluster))
    listen = _tcp_multiaddr(args.listen, "--listen")
    try:
        relay = RelayService(listen, _relay_policy(args), members.allows,
                             relay_seed((args.key or _data_home() / "p2pexec" / "relay_ed25519").expanduser()))
    except OSError as exc:
        raise P2PExecError(f"the relay cannot listen on {args.listen}: {exc.strerror}") from None
    public = [f"{a}/p2p/{relay.peer_id}" for a in relay.addrs
              if (tcp := split_tcp(a)) is not None and scope(tcp[0]) != "loopback"]
    announce = _announced(args, relay.peer_id) or public or [f"{a}/p2p/{relay.peer_id}" for a in relay.addrs]
    print(f"p2pexec relay listening on port {relay.port}; members may use it (from {members.path})", flush=True)
    for addr in announce:
        print(f"  {addr}", flush=True)
    announcer = None
    if who is not None:
        announcer = RelayAnnouncer(who, announce, known_hosts=args.known_hosts,
                                   accept_new_host_key=args.accept_new_host_key)
        try:
            announcer.start()
        except BaseException:
            relay.stop()
            raise
        print(f"announcing it on {who.cluster} at {who.board}", flush=True)
    else:
        print("give members one of these addresses: --relay ADDRESS or P2PEXEC_RELAY=ADDRESS", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    if announcer is not None:
        announcer.stop()
    relay.stop()
    return 0


def _invite(args: argparse.Namespace) -> int:
    from .config import saved_clusters
    from .invites import invite

    saved = saved_clusters()
    code = invite(args.cluster, args.friend, board=args.board, identity=args.identity, user=args.user,
                  known_hosts=args.known_hosts, accept_new_host_key=args.accept_new_host_key)
    if args.cluster not in saved:  # (a typo in the name makes a cluster too)
        print(f"created the cluster {args.cluster}" + (f" (besides {', '.join(saved)})" if saved else ""),
              flush=True)
    print(f"{args.friend} may join {args.cluster} once, within 7 days. Send them this code privately; "
          f"they run: p2pexec join CODE", flush=True)
    print(code)
    return 0


def _join(args: argparse.Namespace) -> int:
    from .invites import join

    for line in join(args.code, identity=args.identity, known_hosts=args.known_hosts):
        print(line)
    return 0


def _remove(args: argparse.Namespace) -> int:
    from .invites import remove

    remove(args.cluster, args.friend, board=args.board, identity=args.identity, user=args.user,
           known_hosts=args.known_hosts, accept_new_host_key=args.accept_new_host_key)
    print(f"{args.friend} is no longer a member of {args.cluster}")
    return 0


def _host(args: argparse.Namespace) -> int:
    import signal
    import threading
    import time

    from .board.client import BoardSession
    from .config import resolve
    from .keys import valid_username
    from .protocol import messages

    who = resolve(args.cluster, board=args.board, user=args.user, identity=args.identity, members=args.members,
                  members_required=False)
    owner = who.cluster.split("/", 1)[0]
    if who.identity.user != owner:
        raise P2PExecError(f"only the owner {owner!r} can set the members of {who.cluster}; you are "
                           f"{who.identity.user!r} (pass --user {owner} with the owner's key)")
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    bad = [u for u in users if not valid_username(u)]
    if bad:
        raise P2PExecError(f"invalid user names: {', '.join(bad)}")
    session = BoardSession(
        who.board, who.identity, who.cluster, inbox=messages.Inbox(who.cluster, who.keyring),
        on_message=lambda msg: None, known_hosts=args.known_hosts, accept_new_host_key=args.accept_new_host_key,
        make_hello=lambda: messages.encode(who.identity, who.cluster, "hello", {"role": "owner"},
                                           now=time.time(), ttl=60),
        pipe_flags=f"-a {','.join(users) or owner}")
    session.open()  # returns once the board relayed our hello: the list is set
    print(f"members of {who.cluster}: {', '.join(users) or '(only you)'}", flush=True)
    if args.keep:
        print("holding the topic open; Ctrl-C to stop", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    session.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from .config import resolve
    from .status import collect, format_status

    who = resolve(args.cluster, board=args.board, user=args.user, identity=args.identity, members=args.members)
    session_options = dict(known_hosts=args.known_hosts, accept_new_host_key=args.accept_new_host_key)
    if args.watch:
        return _watch_status(who, args, session_options)
    status = collect(who, max(0.1, args.wait), **session_options)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


def _watch_status(who: "Participant", args: argparse.Namespace, session_options: dict[str, object]) -> int:
    """Redraw in place on a terminal; elsewhere one block per refresh, so logs and pipes stay readable."""
    import json
    import time

    from .status import format_status, watch

    if args.watch_for is not None and args.watch_for <= 0:
        raise P2PExecError("--for takes a positive number of seconds")
    tty = sys.stdout.isatty()
    try:
        for status in watch(who, every=1.0, duration=args.watch_for, **session_options):
            if args.json:
                print(json.dumps({"time": round(time.time(), 3), **status}), flush=True)
                continue
            block = f"{time.strftime('%H:%M:%S')}  {format_status(status)}"
            print(f"{_CLEAR}{block}\n(Ctrl-C to stop)" if tty else f"{block}\n", flush=True)
    except KeyboardInterrupt:
        pass  # the watcher's session was closed on the way out
    return 0


if __name__ == "__main__":
    sys.exit(main())
