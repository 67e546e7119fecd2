"""What the ``p2pexec`` and ``p2pexec-worker`` commands share: logging, errors, the participant options."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .logs import quiet_dependencies


def setup_logging(verbose: bool, level: int = logging.INFO) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else level,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    quiet_dependencies(verbose)


def fail(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 1


def participant_options() -> argparse.ArgumentParser:
    """Who we are and which board: the options every cluster command shares."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--board", default=None, metavar="URL",
                        help="ssh://user@host:port, a ~/.ssh/config Host, or host (default: $P2PEXEC_BOARD, "
                             "else the board 'p2pexec join' saved for the cluster, else pipe.pico.sh)")
    common.add_argument("--identity", default=None, metavar="KEY",
                        help="SSH Ed25519 private key (default: $P2PEXEC_IDENTITY, ssh-agent, ~/.ssh/id_ed25519)")
    common.add_argument("--user", default=None, help="user name on the board (default: from --board, "
                                                     "$P2PEXEC_USER, or your login name)")
    common.add_argument("--members", default=None, metavar="FILE",
                        help="who may take part: 'NAME ssh-ed25519 KEY' per line "
                             "(default: ~/.config/p2pexec/clusters/OWNER/NAME.members)")
    common.add_argument("--known-hosts", type=Path, default=Path("~/.ssh/known_hosts"), metavar="FILE",
                        help="known_hosts file for the board's host key (default: ~/.ssh/known_hosts)")
    common.add_argument("--accept-new-host-key", action="store_true",
                        help="trust and remember the board's host key if it is not known yet")
    common.add_argument("--relay", action="append", default=None, metavar="MULTIADDR",
                        help="a libp2p relay for peers behind NATs, /ip4/HOST/tcp/PORT/p2p/ID; repeatable "
                             "(default: $P2PEXEC_RELAY, plus the board's own relay if it has one)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs, libp2p's included")
    return common
