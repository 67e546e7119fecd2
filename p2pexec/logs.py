"""Logging conventions: p2pexec logs under ``p2pexec.*``; noisy dependencies stay quiet.

libp2p and paramiko log handled conditions (a peer resetting a stream, a
board restarting) at ERROR.  Unless the user asks for verbose logs, only
CRITICAL gets through.  libp2p configures its logger when first imported
(level WARNING, no propagation), so the setting is applied again then; a
user who set ``LIBP2P_DEBUG`` keeps libp2p's own configuration.  The
``multiaddr`` parser logs every address it parses at DEBUG (thousands of
lines a minute in a worker's verbose log), so it stays at WARNING.
"""

from __future__ import annotations

import logging
import os

_verbose = False


def quiet_dependencies(verbose: bool = False) -> None:
    global _verbose
    _verbose = _verbose or verbose
    _apply("paramiko", user_set=logging.getLogger("paramiko").level != logging.NOTSET and not verbose)
    _apply("libp2p", user_set=bool(os.environ.get("LIBP2P_DEBUG")))
    parser = logging.getLogger("multiaddr")
    if parser.level == logging.NOTSET:
        parser.setLevel(logging.WARNING)


def after_libp2p_import() -> None:
    _apply("libp2p", user_set=bool(os.environ.get("LIBP2P_DEBUG")))


def _apply(name: str, user_set: bool) -> None:
    logger = logging.getLogger(name)
    if _verbose:
        logger.setLevel(logging.DEBUG)
        logger.propagate = True
    elif not user_set:
        logger.setLevel(logging.CRITICAL)
