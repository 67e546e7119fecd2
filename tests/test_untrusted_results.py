"""Results cannot run code on the client: an allow-list unpickler, classes of the client's own code come home
as themselves, and trusted_results=True is the explicit way out."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest

from p2pexec import LocalCluster, UntrustedResultError

pytestmark = pytest.mark.timeout(120)

EVIL_WORKER = str(Path(__file__).parent / "doubles" / "evil_worker.py")


class Mine:
    """Defined in a test module: sent to workers by value, like a notebook's class."""

    def __init__(self, x: int) -> None:
        self.x = x


class MyError(Exception):
    pass


def make_mine(x: int) -> Mine:
    return Mine(x)


def fail(message: str) -> None:
    raise MyError(message)


def chain() -> collections.ChainMap:
    return collections.ChainMap({"a": 1})


@pytest.mark.parametrize("call", ["system", "exit"])
def test_a_crafted_pickle_from_a_worker_runs_nothing_here(tmp_path, call):
    marker = tmp_path / "pwned"
    with LocalCluster(workers=0) as lc:
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "crafted-pickle"], user=lc.owner,
                      env={"EVIL_CALL": call, "EVIL_MARKER": str(marker)})
        with lc.executor() as ex:
            with pytest.raises(UntrustedResultError, match=r"posix\.(system|_exit).*trusted_results=True"):
                ex.submit(abs, -1).result(timeout=60)
    assert not marker.exists()  # (and this process is still alive to say so)


def test_trusted_results_accepts_what_workers_send(tmp_path):
    marker = tmp_path / "pwned"
    with LocalCluster(workers=0) as lc:
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "crafted-pickle"], user=lc.owner,
                      env={"EVIL_CALL": "system", "EVIL_MARKER": str(marker)})
        with lc.executor(trusted_results=True) as ex:
            with pytest.raises(RuntimeError, match="not a task outcome"):  # os.system's exit status came back
                ex.submit(abs, -1).result(timeout=60)
    assert marker.exists()  # it ran here


def test_classes_of_the_clients_own_code_come_home_as_themselves(cluster):
    with cluster.executor() as ex:
        result = ex.submit(make_mine, 7).result(timeout=60)
        assert type(result) is Mine and result.x == 7
        with pytest.raises(MyError, match="caught as itself"):
            ex.submit(fail, "caught as itself").result(timeout=60)


def test_a_type_off_the_list_is_named_with_the_option_that_allows_it(cluster):
    with cluster.executor() as ex:
        with pytest.raises(UntrustedResultError, match=r"collections\.ChainMap.*result_types=\['collections\.ChainMap'\]"):
            ex.submit(chain).result(timeout=60)
    with cluster.executor(result_types=["collections.ChainMap"]) as ex:
        assert ex.submit(chain).result(timeout=60) == collections.ChainMap({"a": 1})
