"""The client's bookkeeping of workers' packages (pure, no workers)."""

from __future__ import annotations

import numpy as np
import packaging.version
from hypothesis import given
from hypothesis import strategies as st

from p2pexec.environment import installed
from p2pexec.fitting import NOTHING, EnvFinder, Fitting, TaskEnv
from p2pexec.tasks import dump_task

NUMPY = installed()["numpy"]


def test_a_functions_needs_are_found_once_and_arguments_only_when_they_may_name_packages():
    finder = EnvFinder()
    first = finder.of(np.sum, True, dump_task(np.sum, (1, 2), {}))
    assert first.needs == {"numpy": NUMPY}
    assert finder.of(np.sum, True, dump_task(np.sum, (3, 4), {})) is first  # plain arguments: cached
    version = packaging.version.Version("1.0")
    mixed = finder.of(len, False, dump_task(len, (version,), {}))
    assert "packaging" in mixed.needs and "numpy" not in mixed.needs
    assert finder.of(len, True, dump_task(len, ([1],), {})) is NOTHING  # stdlib only


def test_a_worker_is_skipped_only_for_what_it_is_known_to_lack():
    fit = Fitting(strict=True)
    env = TaskEnv({"numpy": "2.1.0"}, frozenset({"numpy"}))
    assert fit.misfit("p1", env) is None  # never heard of: worth a try
    fit.heard("p1", "bob", {"numpy": None}, now=0)
    fit.heard("p2", "carol", {"numpy": "1.26.4"}, now=0)
    fit.heard("p3", "dave", {"numpy": "2.0.2"}, now=0)
    assert fit.misfit("p1", env).kind == "missing"
    assert fit.misfit("p2", env).kind == "skew"
    assert fit.misfit("p3", env) is None
    lenient = Fitting(strict=False)
    lenient.heard("p2", "carol", {"numpy": "1.26.4"}, now=0)
    assert lenient.misfit("p2", env) is None


def test_a_task_is_hopeless_only_once_every_online_worker_answered_and_none_fits():
    fit = Fitting()
    env = TaskEnv({"numpy": "2.1.0"}, frozenset({"numpy"}))
    fit.heard("p1", "bob", {"numpy": None}, now=0)
    assert fit.hopeless(env, ["p1", "p2"], now=1) is None  # p2 has not answered
    fit.heard("p2", "carol", {"numpy": "1.2.0"}, now=1)
    error = fit.hopeless(env, ["p1", "p2"], now=2)
    assert error is not None and error.name == "numpy" and sorted(error.workers.values(), key=str) == ["1.2.0", None]
    assert fit.hopeless(env, [], now=2) is None  # nobody online: the no-worker warning's business
    assert fit.hopeless(env, ["p1", "p2"], now=200) is None  # answers that old are not trusted
    fit.heard("p3", "dave", {"numpy": "2.2.0"}, now=2)
    assert fit.hopeless(env, ["p1", "p2", "p3"], now=3) is None
    assert fit.hopeless(NOTHING, ["p1"], now=3) is None


def test_a_module_a_worker_could_not_import_keeps_such_tasks_away_from_it():
    fit = Fitting()
    env = TaskEnv({}, frozenset({"mylib"}))
    fit.lacks("p1", "bob", "mylib", now=0)
    assert fit.misfit("p1", env).dist == "mylib"
    assert fit.misfit("p1", TaskEnv({}, frozenset({"other"}))) is None
    assert fit.hopeless(env, ["p1"], now=1).name == "mylib"


@given(st.dictionaries(st.text(max_size=5) | st.integers(), st.none() | st.text(max_size=5) | st.integers()
                       | st.lists(st.none()), max_size=5) | st.none() | st.integers() | st.lists(st.integers()))
def test_garbled_answers_say_nothing(answer):
    fit = Fitting()
    if isinstance(answer, dict):
        answer.pop("numpy", None)
    fit.heard("p1", "bob", answer, now=0)
    env = TaskEnv({"numpy": NUMPY}, frozenset({"numpy"}))
    assert fit.misfit("p1", env) is None and fit.hopeless(env, ["p1"], now=1) is None


def test_requests_ask_about_a_bounded_number_of_packages():
    fit = Fitting()
    for i in range(100):
        fit.want(TaskEnv({f"pkg{i}": "1.0"}, frozenset({f"pkg{i}"})))
    assert len(fit.asking) == 32
