"""Results cannot run code on the client: an allow-list unpickler, classes of the client's own code come home
as themselves, and trusted_results=True is the explicit way out."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import logging
import sys
import typing
from pathlib import Path

import pytest

from p2pexec import LocalCluster, UntrustedResultError

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)

EVIL_WORKER = str(Path(__file__).parent / "doubles" / "evil_worker.py")


class Mine:
    """Defined in a test module: sent to workers by value, like a notebook's class."""

    def __init__(self, x: int) -> None:
        self.x = x


class MyError(Exception):
    pass


class MineToo(Mine):
    """A class of the client's own code built on another: its pickle rebuilds the one inside the other."""


@dataclasses.dataclass(frozen=True)
class Invalid(Exception):  # (frozen: nothing may be set on it, a traceback by assignment included)
    field: str


class Picky(Mine):
    def __setstate__(self, state: dict) -> None:
        if state["x"] < 0:
            raise Invalid("x")
        self.__dict__.update(state)


def make_picky(x: int) -> Picky:
    return Picky(x)


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


def test_a_class_of_a_tasks_package_is_never_called_with_a_workers_arguments(tmp_path):
    """numpy.memmap(path, "w+") from a hostile worker wrote any file of the client's (numpy's classes are
    allowed once a task is a numpy function)."""
    np = pytest.importorskip("numpy")
    marker = tmp_path / "bashrc"
    marker.write_text("mine\n")
    with LocalCluster(workers=0) as lc:
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "crafted-pickle"], user=lc.owner,
                      env={"EVIL_CALL": "memmap", "EVIL_MARKER": str(marker)})
        with lc.executor() as ex:
            with pytest.raises(UntrustedResultError, match=r"numpy\.memmap by calling it.*result_types"):
                ex.submit(np.sum, [1, 2]).result(timeout=60)
    assert marker.read_text() == "mine\n"


def test_the_careful_pass_rebuilds_what_python_pickles_of_the_clients_own_classes():
    import pickle

    from p2pexec.results import load

    values = [Colour.RED, Pair(1, "b"), Point(1.0, 2.0), Registry(a=Mine(1)), MyError("x")]
    for protocol in range(3, pickle.HIGHEST_PROTOCOL + 1):  # (workers use 5; 0-2 name Python 2's modules)
        colour, pair, point, registry, error = load(pickle.dumps(values, protocol=protocol), [])
        assert (colour, pair, point, registry["a"].x) == (Colour.RED, Pair(1, "b"), Point(1.0, 2.0), 1), protocol
        assert type(registry) is Registry and type(error) is MyError and error.args == ("x",)


def test_what_is_refused_is_refused_wherever_it_hides_and_dropped_only_with_a_class_sent_by_value():
    import pickle

    np = pytest.importorskip("numpy")
    from p2pexec.results import load

    hidden = np.empty(1, dtype=object)
    hidden[0] = collections.ChainMap({"a": 1})  # off the list; an object array's items are not gc referents
    for value in (hidden, [Mine(1), collections.ChainMap()], {"k": Registry(a=collections.ChainMap())}):
        with pytest.raises(UntrustedResultError, match="collections.ChainMap"):
            load(pickle.dumps(value, protocol=5), [], packages={"numpy"})


def test_a_result_cannot_change_a_class_here():
    import pathlib

    from p2pexec.results import load

    fspath = pathlib.PurePath.__fspath__
    with pytest.raises(UntrustedResultError, match="changed 'PurePath'"):  # (the C pass: restored after)
        load(b"\x80\x04cpathlib\nPurePath\nN}\x8c\x0a__fspath__\x8c\x04evils\x86b.", [])
    assert pathlib.PurePath.__fspath__ is fspath
    crafted = b"\x80\x04c" + __name__.encode() + b"\nMine\nN}\x8c\x01x\x8c\x04evils\x86b."
    with pytest.raises(UntrustedResultError, match="changes 'Mine'"):  # (the careful pass: refused before)
        load(crafted, [])
    assert not hasattr(Mine, "x")
    import copyreg
    import pickle

    class SetDefaults:
        def __reduce__(self):
            return setattr, (copyreg._reconstructor, "__defaults__", (1,))

    defaults = copyreg._reconstructor.__defaults__
    for value in ([Mine(1), SetDefaults()], [SetDefaults()]):  # the careful pass, then the C pass
        load(pickle.dumps(value, protocol=5), [])
        assert copyreg._reconstructor.__defaults__ is defaults


def test_a_worker_whose_result_changes_a_class_here_is_dropped_the_class_restored_and_the_task_fails(caplog):
    caplog.set_level(logging.WARNING, logger="p2pexec")
    with LocalCluster(workers=0) as lc:
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "crafted-pickle"], user=lc.owner,
                      env={"EVIL_CALL": "mutate", "EVIL_MARKER": ""})
        with lc.executor() as ex:
            with pytest.raises(UntrustedResultError, match="changed 'PurePath'"):
                ex.submit(abs, -1).result(timeout=60)
            wait_until(lambda: any("broke the protocol" in r.getMessage() for r in caplog.records), 30)
    assert open(Path(__file__)).readline()  # open() still takes a Path here


def test_trusted_results_accepts_what_workers_send(tmp_path):
    marker = tmp_path / "pwned"
    with LocalCluster(workers=0) as lc:
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "crafted-pickle"], user=lc.owner,
                      env={"EVIL_CALL": "system", "EVIL_MARKER": str(marker)})
        with lc.executor(trusted_results=True) as ex:
            with pytest.raises(RuntimeError, match="not a task outcome"):  # os.system's exit status came back
                ex.submit(abs, -1).result(timeout=60)
    assert marker.exists()  # it ran here


class Pair(typing.NamedTuple):
    a: int
    b: str


class Colour(enum.Enum):
    RED = 1


@dataclasses.dataclass(frozen=True)
class Point:
    x: float
    y: float


class Registry(dict):
    pass


class Reduced:
    """Pickled by calling the class (its own ``__reduce__``): only with the client's word that this is harmless."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __reduce__(self):
        return Reduced, (self.x,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reduced) and other.x == self.x


class Child(Mine):
    """Methods that use ``super()`` and a property: dill sends their cells and builtins with the class."""

    def __init__(self, x: int) -> None:
        super().__init__(x)

    @property
    def double(self) -> int:
        return 2 * len(str(self.x))


class HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def own_values() -> list:
    return [Mine(7), Pair(1, "b"), Registry(a=Mine(1)), Child(5), Point(1.0, 2.0), range(3)]


def http_fail() -> None:
    raise HTTPError(404)


def test_classes_of_the_clients_own_code_come_home_as_themselves(cluster):
    with cluster.executor() as ex:
        result = ex.submit(make_mine, 7).result(timeout=60)
        assert type(result) is Mine and result.x == 7
        with pytest.raises(MyError, match="caught as itself"):
            ex.submit(fail, "caught as itself").result(timeout=60)
        mine, pair, registry, child, point, numbers = ex.submit(own_values).result(timeout=60)
        assert (type(mine), mine.x, pair) == (Mine, 7, Pair(1, "b"))
        assert type(registry) is Registry and registry["a"].x == 1
        assert (type(child), child.double, point, numbers) == (Child, 2, Point(1.0, 2.0), range(3))
        with pytest.raises(HTTPError, match="HTTP 404") as caught:
            ex.submit(http_fail).result(timeout=60)
        assert caught.value.status == 404 and "http_fail" in str(caught.value.__cause__)
        with pytest.raises(UntrustedResultError, match=r"Reduced by calling it.*result_types=\['tests\."):
            ex.submit(Reduced, 3).result(timeout=60)
    with cluster.executor(result_types=[f"{__name__}.Reduced"]) as ex:
        assert ex.submit(Reduced, 3).result(timeout=60) == Reduced(3)


def test_a_type_off_the_list_is_named_with_the_option_that_allows_it(cluster):
    with cluster.executor() as ex:
        with pytest.raises(UntrustedResultError, match=r"collections\.ChainMap.*result_types=\['collections\.ChainMap'\]"):
            ex.submit(chain).result(timeout=60)
    with cluster.executor(result_types=["collections.ChainMap"]) as ex:
        assert ex.submit(chain).result(timeout=60) == collections.ChainMap({"a": 1})


def a_lock():
    import threading

    return threading.Lock()


class ReducesToALock:
    """What a worker's lock looked like to the client before workers refused to pickle one: dill's rebuilder."""

    def __reduce__(self):
        import dill._dill

        return dill._dill._create_lock, (False,)


def buffers():
    import io

    return io.StringIO("text"), io.BytesIO(b"bytes")


def test_a_resource_of_the_worker_is_refused_with_advice_and_in_memory_buffers_pass(cluster):
    with cluster.executor() as ex:
        with pytest.raises(UntrustedResultError, match="a resource of the worker's") as refused:
            ex.submit(ReducesToALock).result(timeout=60)
        assert "result_types" not in str(refused.value)  # (allowing dill's rebuilders would open files here)
        with pytest.raises(TypeError, match="could not be pickled.*cannot pickle '_thread.lock'"):
            ex.submit(a_lock).result(timeout=60)  # as from ProcessPoolExecutor
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


@pytest.mark.parametrize("value", [
    b"x" * (2 << 20),  # big bytes: dill names their type (the C pass, through a closure of the loader's)
    [Mine(1), b"x" * (2 << 20)],  # a class of the client's own code: the careful pass
], ids=["big bytes", "own class"])
def test_a_result_lets_go_of_its_message_as_it_is_read_not_at_the_next_cyclic_collection(value):
    def check(got):
        if isinstance(value, bytes):
            assert got == value
        else:
            assert (type(got[0]), got[0].x, got[1]) == (Mine, 1, value[1])

    _read_and_let_go(value, check)


def test_a_result_the_c_pass_gives_up_on_midway_lets_go_of_its_message():
    np = pytest.importorskip("numpy")
    value = [np.arange(2 << 20, dtype=np.uint8), MineToo(1)]  # the array (over the message) and a closure of

    def check(got):  # the loader's are on the C pass's own stack as it gives up: out of the cyclic GC's sight
        assert (got[0] == value[0]).all() and (type(got[1]), got[1].x) == (MineToo, 1)

    _read_and_let_go(value, check)


def _read_and_let_go(value, check) -> None:
    import mmap

    from p2pexec.tasks import dump_outcome, load_outcome

    payload = b"".join(bytes(p) for p in dump_outcome(True, value, "", ""))
    message = mmap.mmap(-1, len(payload))  # (a client's big message: its memory goes when its last view does)
    message[:] = payload
    with _no_cyclic_gc():  # a loader in a reference cycle would hold the message until the next full collection
        check(load_outcome(memoryview(message), trusted=False).value)  # (an array stays where it arrived)
        message.close()  # BufferError if anything else still held a view of it


@pytest.mark.parametrize("pickled, error", [
    (b"\x80\x04cdill._dill\n_load_type\ncos\nsystem\n\x85R.", UntrustedResultError),  # refused, careful pass
    (b"\x80\x04cdill._dill\n_load_type\n", EOFError),  # cut short after one of the loader's closures
], ids=["refused", "cut short"])
def test_a_result_that_fails_midway_lets_go_of_its_message(pickled, error):
    """The C pass may leave a closure of its loader on the unpickler's own stack: a cycle the memo is not in."""
    import mmap

    from p2pexec.results import load

    message = mmap.mmap(-1, 1 << 20)
    with _no_cyclic_gc():
        with pytest.raises(error):
            load(pickled, [memoryview(message)])  # (the result's out-of-band buffers: views of its message)
        message.close()


@contextlib.contextmanager
def _no_cyclic_gc():
    import gc

    was = gc.isenabled()
    gc.collect()  # (what earlier tests left does not count)
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def test_a_result_that_fails_to_unpickle_here_fails_its_future_saying_where(cluster):
    with cluster.executor() as ex:
        error = ex.submit(make_picky, -1).exception(timeout=30)  # (the error is frozen: a traceback set on it
    assert isinstance(error, RuntimeError) and "could not be unpickled here" in str(error)  # would fail)
    assert isinstance(error.__cause__, Invalid) and error.__cause__.__traceback__ is None  # (it held the message)
    assert "__setstate__" in "".join(error.__notes__)  # where, as text
