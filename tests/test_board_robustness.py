"""Hostile lines on the board and board restarts never break a running map."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

import paramiko
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from p2pexec import LocalCluster
from p2pexec.errors import P2PExecError
from p2pexec.keys import Identity, load_identity
from p2pexec.protocol.messages import SCHEMAS, encode

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def double(x):
    return 2 * x


def slow_double(x):
    time.sleep(0.01)
    return 2 * x


@pytest.fixture(scope="module")
def pico_like():
    """A cluster whose board relays anything, as pico.sh does: clients alone must reject forgeries."""
    with LocalCluster(workers=2, verify_senders=False) as lc:
        yield lc


class Injector:
    """A member's raw SSH session writing arbitrary bytes to the cluster's topic."""

    def __init__(self, lc: LocalCluster) -> None:
        host, port = lc.board.rsplit("@", 1)[1].rsplit(":", 1)
        self.client = paramiko.SSHClient()
        self.client.load_host_keys(lc.known_hosts)
        self.client.connect(host, int(port), username=lc.owner, key_filename=lc.identity,
                            allow_agent=False, look_for_keys=False, timeout=10)
        self.channel = self.client.get_transport().open_session()
        self.channel.exec_command(f"pipe {lc.cluster} -c")

    def send(self, lines: list[bytes]) -> None:
        for line in lines:
            self.channel.sendall(line + b"\n")

    def close(self) -> None:
        self.client.close()


OWNER_KEY = {}


def _identities(lc):
    if "owner" not in OWNER_KEY:
        OWNER_KEY["owner"] = load_identity(lc.owner, lc.identity)
        OWNER_KEY["friend"] = load_identity(lc.worker_user, lc.worker_identity)
    return OWNER_KEY["owner"], OWNER_KEY["friend"]


body = st.dictionaries(st.sampled_from(["req", "n", "py", "to", "slots", "peer", "addrs", "kx", "offer", "worker",
                                        "role"]),
                       st.one_of(st.integers(-5, 10**6), st.text(max_size=30), st.lists(st.text(max_size=10),
                                                                                          max_size=3)),
                       max_size=8)


@st.composite
def hostile_line(draw, lc):
    owner, friend = _identities(lc)
    kind = draw(st.sampled_from(["garbage", "json", "stranger", "wrong-from", "tampered", "expired",
                                 "other-cluster", "oversize", "replay"]))
    now = time.time()
    mtype = draw(st.sampled_from(sorted(SCHEMAS)))
    fields = {"req": "r", "n": 1, "py": "3.11", "to": lc.owner, "slots": 1, "peer": "x", "addrs": [], "kx": "AA==",
              "offer": "o", "worker": lc.worker_user, "role": "worker"}
    fields = {k: v for k, v in fields.items() if k in SCHEMAS[mtype]}
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=300)).replace(b"\n", b" ")  # blank lines are skipped
    if kind == "json":
        return json.dumps(draw(body)).encode()
    if kind == "oversize":
        return b"{" + b"x" * draw(st.integers(5000, 60000)) + b"}"
    if kind == "stranger":
        return encode(Identity("mallory", SigningKey.generate()), lc.cluster, mtype, fields, now=now, ttl=10)
    if kind == "wrong-from":  # the worker's key claiming to be the owner
        return encode(Identity(lc.owner, friend.signing_key), lc.cluster, mtype, fields, now=now, ttl=10)
    if kind == "expired":
        return encode(friend, lc.cluster, mtype, fields, now=now - 100, ttl=10)
    if kind == "other-cluster":
        return encode(friend, "alice/elsewhere", mtype, fields, now=now, ttl=10)
    line = encode(friend, lc.cluster, mtype, fields, now=now, ttl=10)
    if kind == "replay":
        return line  # sent twice below; the copy must be dropped
    data = bytearray(line)
    i = draw(st.integers(0, 10**6)) % len(data)  # the line's length varies with the clock
    data[i] = (data[i] + draw(st.integers(1, 25))) % 128 or 65
    return bytes(data).replace(b"\n", b" ")


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_lines_never_break_a_map(pico_like, data):
    lines = data.draw(st.lists(hostile_line(pico_like), min_size=1, max_size=25))
    injector = Injector(pico_like)
    try:
        with pico_like.executor(lease_idle=0.05) as ex:
            dropped = ex._board.inbox.dropped
            before = sum(dropped.values())
            stop = threading.Event()

            def inject():  # paced under the board's rate limit: the point is hostile content, not a flood
                while True:
                    injector.send(lines + lines[-1:])
                    if stop.wait(0.2):
                        return

            injecting = threading.Thread(target=inject, daemon=True)
            injecting.start()
            try:
                wait_until(lambda: sum(dropped.values()) > before, what="hostile lines to reach the client")
                assert list(ex.map(slow_double, range(30), chunksize=2)) == [2 * i for i in range(30)]
                assert ex.submit(double, 21).result() == 42
            finally:
                stop.set()
                injecting.join(10)
    finally:
        injector.close()


def test_board_restart_in_the_middle_of_a_map():
    with LocalCluster(workers=2) as lc:
        with lc.executor() as ex:
            futures = [ex.submit(slow_double, i) for i in range(300)]
            futures[20].result(timeout=60)
            lc.restart_board()
            assert [f.result(timeout=60) for f in futures] == [2 * i for i in range(300)]
        with lc.executor() as ex:  # matching works through the restarted board
            assert list(ex.map(double, range(10))) == [2 * i for i in range(10)]


def test_board_down_longer_than_the_backoff_then_back(caplog):
    with LocalCluster(workers=1) as lc, caplog.at_level(logging.DEBUG, logger="p2pexec.board"):
        with lc.executor(lease_idle=0.1) as ex:
            assert ex.submit(double, 1).result(timeout=30) == 2
            wait_until(lambda: not ex._scheduler.core.leases, what="the idle lease to end")
            lc.stop_board()
            pending = ex.submit(double, 5)  # cannot be matched while the board is away
            wait_until(lambda: not ex._board.connected.is_set(), what="the client to notice")
            tries = lambda: [r for r in caplog.records if "reconnecting to the board failed" in r.getMessage()]
            wait_until(lambda: len(tries()) >= 5, what="five tries to reconnect")
            assert not pending.done()
            lc.restart_board()
            assert pending.result(timeout=60) == 10
    # one line when the board went, one when it came back; the tries in between (a worker's board may be down
    # all night, every 5 s) at DEBUG only
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.module == "client"]  # (not the board)
    assert len(said) == 2 and "lost the connection" in said[0] and "reconnected" in said[1], said
    assert all(r.levelno == logging.DEBUG for r in tries())


def test_a_worker_started_while_the_board_is_down_waits_for_it():
    with LocalCluster(workers=0) as lc:
        lc.stop_board()
        started: list[object] = []
        starting = threading.Thread(target=lambda: started.append(lc.add_worker()), daemon=True)
        starting.start()
        wait_until(lambda: lc.workers and "cannot reach the board" in lc.workers[0].log_path.read_text(),
                   timeout=30, what="the worker to say the board is unreachable")
        assert lc.workers[0].popen.poll() is None, "the worker gave up instead of waiting for its board"
        lc.restart_board()
        starting.join(60)
        assert started, "the worker did not start serving once the board was back"
        log = lc.workers[0].log_path.read_text()
        assert "trying again" in log and "reached the board" in log
        with lc.executor() as ex:
            assert ex.submit(double, 21).result(timeout=60) == 42


def test_ctrl_c_stops_a_worker_still_waiting_for_its_board():
    with LocalCluster(workers=0) as lc:
        lc.stop_board()
        starting = threading.Thread(target=lambda: pytest.raises(P2PExecError, lc.add_worker), daemon=True)
        starting.start()
        wait_until(lambda: lc.workers and "cannot reach the board" in lc.workers[0].log_path.read_text(),
                   timeout=30, what="the worker to say the board is unreachable")
        lc.workers[0].popen.send_signal(signal.SIGINT)
        assert lc.workers[0].popen.wait(timeout=20) == 0
        starting.join(20)
