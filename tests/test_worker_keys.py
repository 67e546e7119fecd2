"""The worker's keys: a fresh key-exchange pair per offer, a memory closed to its tasks, and a word on its key."""

from __future__ import annotations

import threading
import time

import pytest

from p2pexec import LocalCluster
from p2pexec.board.address import BoardAddress
from p2pexec.board.client import BoardSession
from p2pexec.keys import Keyring, load_identity
from p2pexec.protocol import messages
from p2pexec.protocol.matching import REVISION

pytestmark = pytest.mark.timeout(90)


def test_every_offer_has_its_own_key_exchange_key_and_the_worker_says_how_it_signs():
    with LocalCluster(workers=1) as lc:
        alice = load_identity(lc.owner, lc.identity)
        offers: list[messages.Message] = []
        two = threading.Event()

        def on_message(msg: messages.Message) -> None:
            if msg.type == "offer":
                offers.append(msg)
                if len(offers) >= 2:
                    two.set()

        session = BoardSession(
            BoardAddress.parse(lc.board), alice, lc.cluster,
            inbox=messages.Inbox(lc.cluster, Keyring.load(lc.members)), on_message=on_message,
            make_hello=lambda: messages.encode(alice, lc.cluster, "hello", {"role": "observer"}, now=time.time(),
                                               ttl=30),
            known_hosts=lc.known_hosts)
        session.open()
        try:
            for req in ("first-request", "second-request"):
                session.send(messages.encode(alice, lc.cluster, "request", {"req": req, "n": 1, "py": _py(),
                                                                               "rev": REVISION},
                                             now=time.time(), ttl=10))
            assert two.wait(30), offers
        finally:
            session.close()
        assert {o["req"] for o in offers} == {"first-request", "second-request"}
        assert len({o["kx"] for o in offers}) == len(offers)  # none reused: one lease's keys reveal no other's
        log = lc.workers[0].log_path.read_text()
        assert f"worker signs as friend with {lc.worker_identity}" in log
        assert "its memory is closed to other processes of this user (non-dumpable)" in log


def _py() -> str:
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor}"


def test_a_worker_on_the_everyday_ssh_key_says_so(tmp_path, monkeypatch, caplog):
    import logging
    from pathlib import Path

    from p2pexec.keys import generate_identity_file
    from p2pexec.worker.lifecycle import say_how_we_sign

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    generate_identity_file(tmp_path / ".ssh" / "id_ed25519", "friend")
    generate_identity_file(tmp_path / "p2pexec_worker", "friend")
    with caplog.at_level(logging.INFO, logger="p2pexec.worker"):
        say_how_we_sign(load_identity("friend", Path("~/.ssh/id_ed25519")), "alice/friends", True)
        assert "general-purpose SSH key" in caplog.text and "--identity ~/.ssh/p2pexec_worker" in caplog.text
        caplog.clear()
        say_how_we_sign(load_identity("friend", tmp_path / "p2pexec_worker"), "alice/friends", True)
        assert "general-purpose" not in caplog.text and "worker signs as friend" in caplog.text


def test_an_owners_worker_is_told_to_lend_as_a_member_of_its_own(tmp_path, caplog):
    import logging

    from p2pexec.keys import generate_identity_file
    from p2pexec.worker.lifecycle import say_how_we_sign

    generate_identity_file(tmp_path / "key", "alice")
    with caplog.at_level(logging.INFO, logger="p2pexec.worker"):
        say_how_we_sign(load_identity("alice", tmp_path / "key"), "alice/friends", True)
    assert "who owns alice/friends" in caplog.text and "p2pexec invite alice/friends alice-box" in caplog.text
    assert "ask for a new invitation" not in caplog.text
