"""Environments that match: which packages a task's pickle names, and whether a worker fits.

The payloads are real: made by :func:`p2pexec.tasks.dump_task`, as the
client sends them.  The distributions are real too: written on disk by
:mod:`tests.fakedist`.
"""

from __future__ import annotations

import decimal
import json
import os
import pickle
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import dill
import numpy as np
import pandas as pd
import packaging.version
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import p2pexec
from p2pexec import MissingPackageError, P2PExecError
from p2pexec.environment import (
    MAX_ASKED, Misfit, answer, distributions, install_command, installed, misfit, misfits, parse_requires,
    referenced_modules,
)
from p2pexec.protocol.frames import unpack_parts
from p2pexec.tasks import PrepickledFunction, dump_task

from .fakedist import REPO_ROOT, make_venv, on_path, write_distribution

MIB = 1 << 20


def task_pickle(fn, *args, **kwargs) -> bytes:
    """The pickle of a task payload exactly as the client sends it (without its out-of-band buffers)."""
    payload = b"".join(bytes(p) for p in dump_task(fn, args, kwargs))
    return bytes(unpack_parts(payload)[0])


def modules_of(fn, *args, **kwargs) -> frozenset[str]:
    return referenced_modules(task_pickle(fn, *args, **kwargs))


# Defined in a test module, so pickled by value (like __main__ or a notebook's code).
def uses_nothing(x):
    return x + 1


def uses_numpy_and_pandas(x):
    return np.asarray(x).sum() + len(pd.Series([1]))


def uses_packaging_attribute(text):
    return packaging.version.Version(text).major


def uses_json(x):
    return json.dumps(x)


class MyVersion(packaging.version.Version):
    """A class of the user's own code, pickled by value, whose base comes from a package."""


# --- what the scanner finds in real task payloads --------------------------------------


@pytest.mark.parametrize("fn, expected", [
    (np.sum, {"numpy"}),
    (packaging.version.parse, {"packaging"}),
    (pd.concat, {"pandas"}),
    (json.dumps, set()),
    (print, set()),
    (uses_nothing, set()),
    (uses_json, set()),
    (lambda x: x, set()),
    (uses_numpy_and_pandas, {"numpy", "pandas"}),
    (uses_packaging_attribute, {"packaging"}),
])
def test_the_function_s_packages(fn, expected):
    assert modules_of(fn, 1) == expected


@pytest.mark.parametrize("arg, expected", [
    (packaging.version.Version("1.2"), {"packaging"}),
    (packaging.version.Version, {"packaging"}),
    (MyVersion("1.2"), {"packaging"}),
    (np.arange(10), {"numpy"}),
    (np.arange(MIB), {"numpy"}),  # out of band: only its reconstructor is in the pickle
    (np.float64(1.5), {"numpy"}),
    (pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), {"pandas", "numpy"}),
    (np, {"numpy"}),  # a module object, by dill's _import_module
    (packaging.version, {"packaging"}),
    ([{"k": (1, [packaging.version.Version("2")])}, {np.int8(3)}], {"packaging", "numpy"}),
    (decimal.Decimal("1.5"), set()),
    (Fraction(1, 3), set()),
    (b"x" * MIB, set()),
])
def test_the_arguments_packages(arg, expected):
    assert modules_of(uses_nothing, arg) == expected
    assert modules_of(uses_nothing, x=arg) == expected


def test_a_map_s_prepickled_function_is_read_inside_its_carrier():
    # map sends the function as a pickle inside a pickle, with the C pickler
    assert modules_of(PrepickledFunction(uses_numpy_and_pandas), 1) == {"numpy", "pandas"}
    assert modules_of(PrepickledFunction(np.sum), [1, 2]) == {"numpy"}
    assert modules_of(PrepickledFunction(uses_nothing), 1) == set()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol(protocol):
    value = [packaging.version.Version("1"), np.arange(3), decimal.Decimal(1)]
    assert referenced_modules(pickle.dumps(value, protocol=protocol)) == {"packaging", "numpy"}
    assert referenced_modules(dill.dumps([np.sum, pd, packaging.version.parse], protocol=protocol)) == {
        "numpy", "pandas", "packaging"}


def test_memoryviews_and_bytearrays_are_read_in_place():
    data = task_pickle(uses_nothing, packaging.version.Version("1"))
    assert referenced_modules(memoryview(data)) == referenced_modules(bytearray(data)) == {"packaging"}


def test_a_64_mib_array_is_skipped_not_read():
    data = dill.dumps(np.zeros(64 * MIB, dtype=np.uint8), protocol=5)  # in band: 64 MiB inside the pickle
    assert len(data) > 64 * MIB
    start = time.perf_counter()
    assert referenced_modules(data) == {"numpy"}
    assert time.perf_counter() - start < 0.05  # about 0.05 ms measured; pickletools.genops takes ~50 ms


# --- garbage never raises -------------------------------------------------------------


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(data):
    assert isinstance(referenced_modules(data), frozenset)


REAL = task_pickle(uses_numpy_and_pandas, packaging.version.Version("1"), pd.DataFrame({"a": [1]}))


def test_every_truncation_finds_a_subset_and_never_raises():
    full = referenced_modules(REAL)
    assert full == {"numpy", "pandas", "packaging"}
    for end in range(len(REAL)):
        assert referenced_modules(REAL[:end]) <= full


@given(st.integers(0, len(REAL) - 1), st.integers(0, 255))
def test_a_corrupted_byte_never_raises(where, byte):
    data = bytearray(REAL)
    data[where] = byte
    assert isinstance(referenced_modules(data), frozenset)


@given(st.binary(max_size=64), st.sampled_from([b"", b"\x80\x05", b"\x80\x04\x95", b"\x80\x02"]))
def test_a_garbage_prepickled_function_never_raises(tail, head):
    carrier = PrepickledFunction(uses_nothing)
    carrier.data = head + tail
    assert isinstance(modules_of(carrier, 1), frozenset)


def test_a_pickle_the_user_sends_as_bytes_is_not_read():
    # only a map's own carrier is read inside; the task may never unpickle these bytes
    assert modules_of(uses_nothing, pickle.dumps(pd.DataFrame({"a": [1]}))) == set()


# --- property: random nests of values from known packages -----------------------------

VALUES = st.sampled_from([
    (packaging.version.Version("3.1"), {"packaging"}),
    (SpecifierSet(">=1"), {"packaging"}),
    (np.arange(4), {"numpy"}),
    (np.float32(2), {"numpy"}),
    (np.dtype("int16"), {"numpy"}),
    (pd.Series([1.0, 2.0]), {"pandas", "numpy"}),
    (pd.Timestamp("2024-01-01"), {"pandas"}),
    (decimal.Decimal("2.5"), set()),
    (Fraction(2, 3), set()),
    (7, set()),
    ("text", set()),
    (b"bytes", set()),
    (None, set()),
])


def nests(leaves):
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: (
            [v for v, _ in items], set().union(*(e for _, e in items)))),
        st.lists(inner, max_size=4).map(lambda items: (
            tuple(v for v, _ in items), set().union(*(e for _, e in items)))),
        st.dictionaries(st.text(max_size=3), inner, max_size=4).map(lambda d: (
            {k: v for k, (v, _) in d.items()}, set().union(*(e for _, e in d.values())))),
    ), max_leaves=12)


FUNCTIONS = st.sampled_from([
    (np.sum, {"numpy"}), (json.dumps, set()), (uses_nothing, set()), (uses_numpy_and_pandas, {"numpy", "pandas"}),
    (uses_packaging_attribute, {"packaging"}),
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FUNCTIONS, st.lists(nests(VALUES), max_size=3), st.booleans())
def test_the_scan_finds_exactly_the_packages_in_a_task(function, args, prepickled):
    fn, expected = function
    values = [v for v, _ in args]
    expected = expected.union(*(e for _, e in args))
    sent = PrepickledFunction(fn) if prepickled else fn
    assert modules_of(sent, *values) == expected


# --- what is installed ---------------------------------------------------------------


def test_distributions_of_a_real_fake_distribution(tmp_path):
    site = write_distribution(tmp_path / "site-packages", "fake-dist.pkg", "2.1.0", module="fakepkg")
    with on_path(site):
        import fakepkg  # noqa: F401 - the package really is importable

        assert installed()["fake-dist-pkg"] == "2.1.0"
        assert distributions({"fakepkg", "numpy", "no_such_module"}) == {
            "fake-dist-pkg": "2.1.0", "numpy": np.__version__}
    assert "fake-dist-pkg" not in installed()  # forgotten with the path


def test_a_task_using_a_fake_package_needs_its_distribution(tmp_path):
    site = write_distribution(tmp_path / "site-packages", "fakepkg", "2.1.0", code="def double(x):\n    return 2 * x\n")
    with on_path(site):
        import fakepkg

        modules = modules_of(fakepkg.double, 1)  # installed code: pickled by reference
        assert modules == {"fakepkg"}
        assert distributions(modules) == {"fakepkg": "2.1.0"}


def test_a_fake_package_outside_site_packages_is_local_code_sent_by_value(tmp_path):
    site = write_distribution(tmp_path / "elsewhere", "fakepkg", "2.1.0", code="def double(x):\n    return 2 * x\n")
    with on_path(site):
        import fakepkg

        assert modules_of(fakepkg.double, 1) == set()


def test_a_module_of_several_distributions_brings_each(tmp_path):
    site = tmp_path / "site-packages"
    write_distribution(site, "ns-one", "1.0", module="sharedns")
    write_distribution(site, "ns-two", "2.0", module="sharedns")
    with on_path(site):
        assert distributions({"sharedns"}) == {"ns-one": "1.0", "ns-two": "2.0"}


def test_local_code_has_no_distribution(tmp_path):
    (tmp_path / "mylocal.py").write_text("X = 1\n")
    with on_path(tmp_path):
        assert distributions({"mylocal", "tests"}) == {}


def test_answer_is_bounded(tmp_path):
    site = write_distribution(tmp_path / "site-packages", "fakepkg", "2.1.0")
    with on_path(site):
        got = answer(["fakepkg", "FakePkg", "numpy", "no-such-dist", 3, None, "x" * 101, ""])
    assert got == {"fakepkg": "2.1.0", "FakePkg": "2.1.0", "numpy": np.__version__, "no-such-dist": None}
    assert len(answer(f"dist{i}" for i in range(1000))) == MAX_ASKED
    assert answer([*[None] * MAX_ASKED, "numpy"]) == {}  # only the first items are read


# --- whether a worker fits -------------------------------------------------------------

RELEASES = st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))


def version(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


@given(RELEASES, st.booleans())
def test_the_same_versions_fit(release, strict):
    needs = {"numpy": version(release)}
    assert misfit(needs, [], needs, strict) is None


@given(RELEASES, st.sampled_from([{}, {"numpy": None}]), st.booleans())
def test_a_missing_distribution(release, have, strict):
    assert misfit({"numpy": version(release)}, [], have, strict) == Misfit("missing", "numpy", version(release), None)


@given(RELEASES, RELEASES)
def test_skew_is_a_different_major_or_0x_minor(ours, theirs):
    found = misfit({"numpy": version(ours)}, [], {"numpy": version(theirs)}, strict=True)
    series = (lambda r: r[:1] if r[0] else r[:2])
    if series(ours) == series(theirs):
        assert found is None
    else:
        assert found == Misfit("skew", "numpy", version(ours), version(theirs))
    assert misfit({"numpy": version(ours)}, [], {"numpy": version(theirs)}, strict=False) is None


@pytest.mark.parametrize("ours, theirs, skewed", [
    ("1.26.4", "2.0.0", True), ("2.0.0", "2.3.1", False), ("0.3.8", "0.4.0", True), ("0.3.8", "0.3.9", False),
    ("1!1.0", "1.0", True), ("2.1.0+cu121", "2.1.0", False), ("2.0.0rc1", "2.0.0", False),
    ("1.0", "not a version", False),
])
def test_skew_examples(ours, theirs, skewed):
    assert (misfit({"d": ours}, [], {"d": theirs}) is not None) is skewed


@given(st.integers(0, 20), st.integers(0, 20))
def test_requires_specifiers(have_major, want_major):
    got = misfit({}, [f"NumPy>={want_major}"], {"numpy": f"{have_major}.0"}, strict=True)
    if have_major >= want_major:
        assert got is None
    else:
        assert got == Misfit("unsatisfied", "numpy", f">={want_major}", f"{have_major}.0", required=True)


def test_requires_a_missing_distribution_and_prereleases():
    assert misfit({}, ["scikit-learn"], {}) == Misfit("missing", "scikit-learn", "", None, required=True)
    assert misfit({}, [Requirement("numpy>=2")], {"numpy": "2.1.0rc1"}) is None
    assert misfit({}, ["numpy>=2"], {"numpy": "a.b"}).kind == "unsatisfied"


def test_missing_comes_first():
    needs = {"numpy": "1.26.4", "pandas": "2.2.0"}
    have = {"numpy": "2.0.0", "scipy": "1.0"}
    assert [m.kind for m in misfits(needs, ["scipy>=2"], have)] == ["missing", "unsatisfied", "skew"]
    assert misfit(needs, ["scipy>=2"], have).dist == "pandas"


def test_descriptions_and_fixes():
    assert Misfit("missing", "numpy", "1.26.4", None).describe() == "numpy is not installed (the client has 1.26.4)"
    assert Misfit("missing", "numpy", ">=2", None, required=True).describe() == (
        "numpy is not installed (required as numpy>=2)")
    assert Misfit("missing", "numpy", "", None, required=True).fix() == "pip install 'numpy'"
    assert Misfit("unsatisfied", "numpy", ">=2", "1.0", True).describe() == "numpy 1.0 does not satisfy numpy>=2"
    skew = Misfit("skew", "numpy", "1.26.4", "2.0.0")
    assert skew.describe() == "numpy 2.0.0 differs in major version from the client's 1.26.4"
    assert skew.fix() == "pip install 'numpy==1.26.4'"


def test_install_command():
    assert install_command("numpy", "1.26.4") == "pip install 'numpy==1.26.4'"
    assert install_command("numpy", ">=2,<3") == "pip install 'numpy>=2,<3'"
    assert install_command("scikit-learn") == "pip install 'scikit-learn'"
    assert install_command("x'y", "1") == "pip install 'x'\"'\"'y==1'"


@pytest.mark.parametrize("bad", ["numpy>=>2", "", "numpy; python_version<'3'", "requests[socks]",
                                 "pip @ https://example.org/pip.whl", 3])
def test_parse_requires_refuses_what_it_cannot_check(bad):
    with pytest.raises(ValueError, match="requires"):
        parse_requires([bad])


def test_parse_requires_accepts_names_specifiers_and_requirements():
    reqs = parse_requires(["numpy>=2", Requirement("scikit-learn"), "pandas ==2.*"])
    assert [str(r) for r in reqs] == ["numpy>=2", "scikit-learn", "pandas==2.*"]
    assert parse_requires("numpy") == (Requirement("numpy"),)


# --- the error the user sees ------------------------------------------------------------


def test_missing_package_error_says_what_and_where_and_how():
    error = MissingPackageError("numpy", "1.26.4", {"carol/w2": "2.1.0", "bob/w1": None})
    text = str(error)
    assert "numpy 1.26.4" in text and "bob/w1 lacks it" in text and "carol/w2 has 2.1.0" in text
    assert "pip install 'numpy==1.26.4'" in text
    assert isinstance(error, ImportError) and isinstance(error, P2PExecError)
    assert error.name == "numpy" and p2pexec.MissingPackageError is MissingPackageError
    many = MissingPackageError("numpy", ">=2", {f"w{i}": None for i in range(20)})
    assert "and 12 more" in str(many) and "pip install 'numpy>=2'" in str(many)


@pytest.mark.parametrize("module", [pickle, dill])
def test_missing_package_error_pickles(module):
    error = MissingPackageError("fake-dist", "2.1.0", {"bob/w1": None, "carol/w2": "1.0"})
    back = module.loads(module.dumps(error))
    assert type(back) is MissingPackageError and str(back) == str(error)
    assert (back.dist, back.version, back.workers, back.name) == ("fake-dist", "2.1.0", error.workers, "fake-dist")
    with pytest.raises(ImportError):
        raise back


# --- another environment for a worker ---------------------------------------------------


def test_make_venv_sees_this_p2pexec_and_only_the_given_fake_distributions(tmp_path):
    site = write_distribution(tmp_path / "old", "fakepkg", "1.0.0")
    with_old = make_venv(tmp_path / "venv-old", [site])
    without = make_venv(tmp_path / "venv-none")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import p2pexec, importlib.util as u; from p2pexec.environment import installed; "
             "print(p2pexec.__file__, u.find_spec('fakepkg') is not None, installed().get('fakepkg'))")
    for python, expected in [(with_old, "True 1.0.0"), (without, "False None")]:
        out = subprocess.run([str(python), "-c", probe], env=env, cwd=tmp_path, check=True,
                             capture_output=True, text=True).stdout.split()
        assert Path(out[0]).is_relative_to(REPO_ROOT) and " ".join(out[1:]) == expected
