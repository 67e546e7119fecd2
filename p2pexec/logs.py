"""Logging conventions: p2pexec logs under ``p2pexec.*``; noisy dependencies stay quiet.

libp2p and paramiko log handled conditions (a peer resetting a stream, a
board restarting) at ERROR.  Unless the user asks for verbose logs, or has
set a level on those loggers themselves, only CRITICAL gets through.
"""

from __future__ import annotations

import logging

NOISY = ("libp2p", "paramiko")


def quiet_dependencies(verbose: bool = False) -> None:
    for name in NOISY:
        logger = logging.getLogger(name)
        if verbose:
            logger.setLevel(logging.DEBUG)
        elif logger.level == logging.NOTSET:
            logger.setLevel(logging.CRITICAL)
