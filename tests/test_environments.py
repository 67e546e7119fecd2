"""Environments that match, end to end: workers started from other virtual environments.

The client has ``p2pexec-fake-a`` 2.1.0 (and ``p2pexec-fake-b``, which no
worker has); one worker lacks both, one has fake-a 2.1.0 (from a venv), one
has fake-a 1.0.0 (another major version), and one has fake-c's and fake-d's
metadata without their code (it says it has them, then cannot import them).
The worker with fake-a 2.1.0 has fake-d 2.1.0 too.
"""

from __future__ import annotations

import logging
import socket

import pytest

from p2pexec import LocalCluster, MissingPackageError, NoWorkersError

from .conftest import wait_until
from .fakedist import make_venv, on_path, write_distribution

CODE = """
def double(x):
    import os
    return 2 * x, os.environ["TEST_WORKER_LABEL"]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("envs")
    client = root / "client" / "site-packages"
    for name in ("p2pexec-fake-a", "p2pexec-fake-b", "p2pexec-fake-c", "p2pexec-fake-d"):
        write_distribution(client, name, "2.1.0", code=CODE)
    for name in ("p2pexec-fake-a", "p2pexec-fake-d"):
        same = write_distribution(root / "same" / "site-packages", name, "2.1.0", code=CODE)
    old = write_distribution(root / "old" / "site-packages", "p2pexec-fake-a", "1.0.0", code=CODE)
    for module in ("p2pexec_fake_c", "p2pexec_fake_d"):
        hollow = write_distribution(root / "hollow" / "site-packages", module.replace("_", "-"), "2.1.0", code=CODE)
        (hollow / module / "__init__.py").unlink()  # its metadata says installed; its code is gone
        (hollow / module).rmdir()
    with LocalCluster(workers=0) as lc:
        for label, site in (("plain", None), ("same", same), ("old", old), ("hollow", hollow)):
            options = {} if site is None else {
                "program": (str(make_venv(root / f"venv-{label}", [site])), "-m", "p2pexec.worker_cli")}
            lc.add_worker(env={"TEST_WORKER_LABEL": label}, **options)
        with on_path(client):
            yield lc


def ran_on(results):
    return {label for _, label in results}


def test_tasks_go_only_to_the_worker_with_the_clients_version(lab):
    lc = lab
    import p2pexec_fake_a

    with lc.executor() as ex:
        results = list(ex.map(p2pexec_fake_a.double, range(16)))
    assert [value for value, _ in results] == [2 * x for x in range(16)]
    assert ran_on(results) == {"same"}


def test_a_package_no_worker_has_fails_naming_it_and_the_command(lab):
    lc = lab
    import p2pexec_fake_b

    with lc.executor() as ex, pytest.raises(MissingPackageError) as caught:
        ex.submit(p2pexec_fake_b.double, 1).result(timeout=60)
    error = caught.value
    assert error.name == "p2pexec-fake-b" and error.version == "2.1.0"
    assert set(error.workers.values()) == {None}
    assert "pip install 'p2pexec-fake-b==2.1.0'" in str(error)
    assert isinstance(error, ImportError)


def test_a_worker_that_cannot_import_a_module_hands_the_task_back(lab, caplog):
    """fake-c's metadata is there but its code is not: the worker says so, and the task fails only once
    every worker is known to lack it."""
    lc = lab
    import p2pexec_fake_c

    caplog.set_level(logging.INFO, logger="p2pexec.client")
    with lc.executor() as ex, pytest.raises(MissingPackageError, match="p2pexec-fake-c"):
        ex.submit(p2pexec_fake_c.double, 1).result(timeout=60)
    assert any("lacks module p2pexec_fake_c" in r.getMessage() for r in caplog.records)


def hold_until_told(port: int) -> tuple[int, str]:
    import os
    import socket

    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(120)
        conn.recv(1)
    return 0, os.environ["TEST_WORKER_LABEL"]


def test_a_task_handed_back_for_a_missing_module_runs_on_a_worker_that_has_it(lab, caplog):
    """hollow says it has fake-d but cannot import it; same has it, busy until the task has come back."""
    lc = lab
    import p2pexec_fake_d

    caplog.set_level(logging.INFO, logger="p2pexec.client")
    with lc.executor() as ex, socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        held = ex.options(requires=["p2pexec-fake-a==2.1.0"]).submit(hold_until_told, listener.getsockname()[1])
        conn, _ = listener.accept()  # same's only slot is taken (and the client knows same is online)
        with conn:
            future = ex.submit(p2pexec_fake_d.double, 1)
            wait_until(lambda: any("lacks module p2pexec_fake_d" in r.getMessage() for r in caplog.records),
                       timeout=60, what="hollow to hand the task back")
            conn.sendall(b"g")
        assert held.result(timeout=60) == (0, "same")
        assert future.result(timeout=60) == (2, "same")


def test_requires_sends_tasks_only_to_workers_that_satisfy_it(lab):
    lc = lab
    with lc.executor(strict_versions=False) as ex:
        old_enough = ex.options(requires=["p2pexec-fake-a<2"])
        assert ran_on(old_enough.map(_where, range(8))) == {"old"}


def test_a_requirement_no_worker_satisfies_says_so(lab):
    lc = lab
    with lc.executor(worker_timeout=5, warn_after=1) as ex:
        with pytest.raises(NoWorkersError, match=r"does not satisfy requires=: p2pexec-fake-a .*>=3"):
            ex.options(requires=["p2pexec-fake-a>=3"]).submit(_where).result(timeout=60)


def test_bad_requirements_fail_at_the_call(lab):
    lc = lab
    with lc.executor() as ex:
        with pytest.raises(ValueError, match="requires"):
            ex.options(requires=["numpy >>> 2"])
        with pytest.raises(ValueError, match="marker"):
            ex.options(requires=["numpy; python_version < '3'"])


def test_another_major_version_is_used_only_when_allowed(lab):
    """Last: it stops the worker with the client's version, leaving only the one with 1.0.0."""
    lc = lab
    import p2pexec_fake_a

    lc.workers[1].kill()
    with lc.executor(strict_versions=False) as ex:
        results = list(ex.map(p2pexec_fake_a.double, range(4)))
    assert ran_on(results) == {"old"}
    with lc.executor() as ex, pytest.raises(MissingPackageError, match="has 1.0.0"):
        ex.submit(p2pexec_fake_a.double, 1).result(timeout=60)


def _where(_: object = None) -> tuple[int, str]:
    import os

    return 0, os.environ["TEST_WORKER_LABEL"]
