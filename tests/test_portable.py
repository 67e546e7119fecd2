"""Portable mode: each Linux-only fast path has a fallback that works, forced on Linux with P2PEXEC_PORTABLE=1."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from p2pexec import LocalCluster, TaskProcessDiedError, portability
from p2pexec.config import resolve
from p2pexec.status import collect
from p2pexec.worker import hop

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
LINUX_CHECKS = ("memfd", "fd_passing", "procfs", "prctl", "sandbox", "loadavg", "file_locks", "rlimits", "lazy_free")
CHECKS = (*LINUX_CHECKS, "hardware_aes")  # (not every CPU does AES: a Raspberry Pi 4 does not)


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (the checks are read once, at import); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def portable():
    """A cluster whose one worker (and so its task processes) runs in portable mode."""
    with LocalCluster(workers=0) as lc:
        lc.add_worker(env={"P2PEXEC_PORTABLE": "1"})
        yield lc


def test_every_check_is_false_in_portable_mode():
    out = _python(f"""
        from p2pexec import portability
        print(__import__("json").dumps({{name: getattr(portability, name)() for name in {CHECKS!r}}}))
    """, P2PEXEC_PORTABLE="1")
    assert json.loads(out) == dict.fromkeys(CHECKS, False)


@pytest.mark.skipif(not sys.platform.startswith("linux") or portability.FORCED, reason="the Linux fast paths")
def test_linux_keeps_every_fast_path_by_default():
    assert all(getattr(portability, name)() for name in LINUX_CHECKS)


def test_p2pexec_imports_and_falls_back_without_fcntl_and_resource():
    """As on Windows: no fcntl, no resource; the modules a client and a worker load still import.

    Third-party packages come first: on Linux some use them (psutil), on Windows they take other paths.
    """
    out = _python("""
        import sys
        import dill, libp2p, multiaddr, nacl, paramiko, trio
        sys.modules["fcntl"] = sys.modules["resource"] = None
        import p2pexec, p2pexec.executor, p2pexec.local, p2pexec.cli
        import p2pexec.worker.daemon, p2pexec.worker.taskproc
        from p2pexec import portability
        from p2pexec.worker import hop
        from p2pexec.worker.sandbox import Sandbox
        assert not (portability.memfd() or portability.file_locks() or portability.rlimits())
        assert type(hop.allocate(10)) is bytearray
        assert Sandbox(None, memory=1 << 30).limits() is None
        print("imported")
    """, P2PEXEC_PORTABLE="0")
    assert out.strip() == "imported"


def portable_here():
    from p2pexec import portability
    from p2pexec.worker import hop

    return portability.FORCED, hop.shared()


def test_local_workers_and_their_task_processes_inherit_portable_mode(cluster):
    """So ``P2PEXEC_PORTABLE=1 pytest`` (a CI run) puts every LocalCluster worker through the fallbacks."""
    with cluster.executor() as ex:
        assert ex.submit(portable_here).result(timeout=60) == (portability.FORCED, hop.shared())


def payload_place(view):
    """Does the task's argument lie in the daemon's memfd (the argument, out of band, is a view of it)?"""
    with open("/proc/self/maps") as maps:
        return "memfd:p2pexec-data" in maps.read(), bytes(view[:4])


def inline_round_trip(view):
    """Take memfds away from this task process, then send back more than SHARED_MIN."""
    from p2pexec.worker import hop

    def no_memfd(*args):
        raise RuntimeError("a memfd was made for the outcome")  # not an OSError: that would fall back inline

    os.memfd_create = no_memfd
    with open("/proc/self/maps") as maps:
        mapped = "memfd:p2pexec-data" in maps.read()
    return mapped, hop.shared(), bytes(view[::-1])


@pytest.mark.skipif(not hop.shared(), reason="the memfd hop is what the inline one is compared with")
def test_big_data_hops_through_shared_memory_on_a_linux_worker(cluster):
    data = os.urandom(2 * MIB)
    with cluster.executor() as ex:
        assert ex.submit(payload_place, memoryview(data)).result(timeout=60) == (True, data[:4])
        with pytest.raises(TaskProcessDiedError):  # its outcome would go to a memfd, which the task refuses
            ex.submit(inline_round_trip, memoryview(data)).result(timeout=60)


def test_big_payloads_and_outcomes_go_inline_on_a_portable_worker(portable):
    data = os.urandom(3 * MIB)
    with portable.executor() as ex:
        assert ex.submit(inline_round_trip, memoryview(data)).result(timeout=60) == (False, False, data[::-1])
        assert ex.submit(bytes, data).result(timeout=60) == data


@pytest.mark.parametrize("which", ["cluster", "portable"])
def test_a_lease_seals_with_aegis_only_where_both_ends_do_aes_in_hardware(which, request, caplog):
    """A portable worker says it has no hardware AES, so its leases (and all of the portable pass's) exercise
    XChaCha20-Poly1305 end to end, while CPUs that both have AES seal with AEGIS-256."""
    caplog.set_level(logging.INFO, logger="p2pexec.client")
    data = os.urandom(3 * MIB)
    with request.getfixturevalue(which).executor() as ex:
        assert ex.submit(bytes, data).result(timeout=60) == data
    leased = [r.getMessage() for r in caplog.records if r.getMessage().startswith("leased")]
    expected = "AEGIS-256" if portability.hardware_aes() and which == "cluster" else "XChaCha20-Poly1305"
    assert leased and all(expected in line for line in leased)


def _is_socket(fd):
    import stat

    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def forge_a_shared_outcome():
    """Send the daemon a file descriptor as a shared outcome, as hostile code in a task process could."""
    import socket
    import time

    from p2pexec.worker.hop import HEADER, SHARED

    fd = next(fd for fd in range(3, 256) if _is_socket(fd))
    hop_socket = socket.socket(fileno=os.dup(fd))
    reader, _ = os.pipe()
    socket.send_fds(hop_socket, [HEADER.pack(SHARED, 0, MIB)], [reader])
    time.sleep(60)


def test_a_portable_worker_takes_no_file_descriptors_from_its_task_processes(portable):
    with portable.executor() as ex:
        with pytest.raises(TaskProcessDiedError, match="broke the hop protocol"):
            ex.submit(forge_a_shared_outcome).result(timeout=60)
        assert list(ex.map(abs, range(-3, 0))) == [3, 2, 1]
    assert portable.workers[0].popen.poll() is None


def test_a_portable_worker_says_it_has_no_sandbox_and_no_load(portable):
    out = _python("""
        from p2pexec.worker.sandbox import detect
        sandbox = detect(memory=1 << 30)
        print(sandbox.enforced, sandbox.limits(), sandbox.describe()[0], sandbox.describe()[-1], sep="|")
    """, P2PEXEC_PORTABLE="1")
    assert out.strip().split("|") == ["False", "None",
                                      "NOT SANDBOXED (not enforced on this platform: P2PEXEC_PORTABLE=1 is set): "
                                      "tasks run as this user and can read its files (~/.ssh included), use the "
                                      "network and leave processes behind",
                                      "memory: not capped: not enforced on this platform"]
    who = resolve(portable.cluster, board=portable.board, identity=portable.worker_identity,
                  members=portable.members, user=portable.worker_user)
    workers = collect(who, 1.0, known_hosts=portable.known_hosts)["workers"]
    assert [(w["load"], w["platform"]) for w in workers] == [(None, sys.platform)]


def test_the_history_is_kept_and_trimmed_without_file_locks(tmp_path):
    out = _python(f"""
        from pathlib import Path
        from p2pexec.worker.history import Entry, History
        history = History(Path({str(tmp_path / "h.jsonl")!r}), max_bytes=2000, keep_bytes=1000)
        for i in range(40):
            history.append([Entry(member="alice", function=f"mod.f{{i}}", start=i, seconds=0.5, outcome="ok",
                                  cluster="alice/friends")])
        print(" ".join(e.function for e in history.recent(100)))
    """, P2PEXEC_PORTABLE="1")
    functions = out.split()
    assert functions[-1] == "mod.f39" and 5 < len(functions) < 40
    assert functions == [f"mod.f{i}" for i in range(40 - len(functions), 40)]
