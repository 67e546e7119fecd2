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


def a_lock():
    import threading

    return threading.Lock()


def buffers():
    import io

    return io.StringIO("text"), io.BytesIO(b"bytes")


def test_a_resource_of_the_worker_is_refused_with_advice_and_in_memory_buffers_pass(cluster):
    with cluster.executor() as ex:
        with pytest.raises(UntrustedResultError, match="a resource of the worker's") as refused:
            ex.submit(a_lock).result(timeout=60)
        assert "result_types" not in str(refused.value)  # (allowing dill's rebuilders would open files here)
        text, data = ex.submit(buffers).result(timeout=60)
    assert (text.getvalue(), data.getvalue()) == ("text", b"bytes")


def pandas_values() -> list:
    """What a data-science task returns: frames with several dtypes, indexes, scalars, offsets, time zones."""
    import numpy as np
    import pandas as pd

    return [pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": pd.to_datetime(["2020-01-01", "2021-01-01"]),
                          "d": pd.Categorical(["u", "v"]), "e": pd.array([1, None], dtype="Int64"),
                          "f": pd.array([True, None], dtype="boolean"), "g": pd.array(["s", None], dtype="string"),
                          "h": pd.array([0.5, None], dtype="Float64"), "i": pd.arrays.SparseArray([0, 1])}),
            pd.Series([1.5, 2.5], index=pd.Index(["p", "q"], name="k")),
            pd.DataFrame(np.arange(6).reshape(3, 2)).set_index(0),
            pd.MultiIndex.from_tuples([(1, "a"), (2, "b")]), pd.RangeIndex(5), pd.CategoricalIndex(["a", "b"]),
            pd.date_range("2020", periods=3, freq="h", tz="Europe/Stockholm"), pd.timedelta_range("1s", periods=2),
            pd.period_range("2020-01", periods=2, freq="M"), pd.interval_range(0, 3),
            pd.Timestamp("2020-01-01", tz="UTC"), pd.Timedelta("1s"), pd.NaT, pd.NA, pd.Interval(0, 1),
            pd.Period("2020-01", freq="M"), pd.offsets.Week(2), pd.CategoricalDtype(["a"])]


def test_pandas_results_pass_the_allow_list(cluster):
    pytest.importorskip("pandas")
    with cluster.executor() as ex:
        got = ex.submit(pandas_values).result(timeout=60)
    assert [repr(v) for v in got] == [repr(v) for v in pandas_values()]


def test_a_lookup_of_a_method_that_runs_code_is_refused():
    pd = pytest.importorskip("pandas")
    import pickle

    from p2pexec.results import load

    class Lookup:
        def __reduce__(self):
            return getattr, (pd.DataFrame, "eval")  # DataFrame.eval("...") evaluates expressions

    with pytest.raises(UntrustedResultError, match="DataFrame.eval"):
        load(pickle.dumps(Lookup()), [])


def test_classes_of_the_installed_package_a_task_comes_from_are_allowed(cluster):
    from packaging.version import Version, parse  # an installed package, not on the allow-list

    with cluster.executor() as ex:
        assert ex.submit(parse, "1.2").result(timeout=60) == Version("1.2")
        assert list(ex.map(parse, ["1.0", "2.0"], chunksize=2)) == [Version("1.0"), Version("2.0")]
    with cluster.executor() as ex:  # the same class from a task of another package: refused
        with pytest.raises(UntrustedResultError, match="packaging.version.Version"):
            ex.submit(eval, "__import__('packaging.version').version.Version('1.2')").result(timeout=60)


def test_a_class_reached_through_an_import_is_not_the_clients_own():
    """``__main__.subprocess.Popen`` names Popen through __main__'s import: it is not a class of __main__."""
    import subprocess  # noqa: F401 - what a script typically imports
    import sys

    from p2pexec.results import load

    main = sys.modules["__main__"]
    had = hasattr(main, "subprocess")
    main.subprocess = subprocess  # type: ignore[attr-defined]
    try:
        crafted = b"c__main__\nsubprocess.Popen\n((lp0\nVtrue\natR."
        with pytest.raises(UntrustedResultError):
            load(crafted, [])
        with pytest.raises(UntrustedResultError):  # nor through a trusted package's module
            load(b"cpackaging.version\nre.Pattern\n.", [], packages={"packaging"})
    finally:
        if not had:
            del main.subprocess
