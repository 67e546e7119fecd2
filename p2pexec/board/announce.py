"""The owner's word on where the cluster's relay is, kept on the board (for boards without a relay: pico.sh).

The board has no history, so the announcement is the session's first line
(its echo confirms the join), repeated every :data:`EVERY` seconds and to
every member who says hello (at most twice a second), since a newcomer
missed the last one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..config import Participant
from ..protocol import messages
from ..protocol.observers import ANSWER_AT_MOST_EVERY
from .client import BoardSession

EVERY = 30.0
TTL = 120.0


class RelayAnnouncer:
    """Announces relay addresses on a cluster's board as its owner (``who`` must be the owner)."""

    def __init__(self, who: Participant, addrs: list[str], *, known_hosts: Path,
                 accept_new_host_key: bool = False) -> None:
        self._who, self._addrs = who, addrs
        self._last_answer = 0.0
        self._stop = threading.Event()
        self._session = BoardSession(who.board, who.identity, who.cluster,
                                     inbox=messages.Inbox(who.cluster, who.keyring), on_message=self._answer,
                                     make_hello=self._announcement, known_hosts=known_hosts,
                                     accept_new_host_key=accept_new_host_key)
        self._thread = threading.Thread(target=self._repeat, name="p2pexec-relay-announce", daemon=True)

    def start(self) -> None:
        """Join the board (raising a precise BoardError if impossible) and keep announcing."""
        self._session.open()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._session.close()

    def _announcement(self) -> bytes:
        return messages.encode(self._who.identity, self._who.cluster, "relay", {"addrs": self._addrs},
                               now=time.time(), ttl=TTL)

    def _answer(self, msg: messages.Message) -> None:
        if msg.type == "hello" and time.monotonic() - self._last_answer > ANSWER_AT_MOST_EVERY:
            self._last_answer = time.monotonic()
            self._session.send(self._announcement())

    def _repeat(self) -> None:
        while not self._stop.wait(EVERY):
            self._session.send(self._announcement())
