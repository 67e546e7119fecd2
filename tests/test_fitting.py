"""The client's bookkeeping of workers' packages (pure, no workers)."""

from __future__ import annotations

import logging

import numpy as np
import packaging.version
from hypothesis import given
from hypothesis import strategies as st

from p2pexec.environment import installed
from p2pexec.fitting import LACK_EXPIRES, NOTHING, EnvFinder, Fitting, TaskEnv
from p2pexec.seeding import Seeded
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


def test_a_seeded_executors_submits_find_their_functions_needs_once():
    """Each seeded submit wraps the function anew: the cache is keyed on the function inside."""
    finder = EnvFinder()
    first = finder.of(Seeded(np.sum, 7, (0, 0)), True, dump_task(Seeded(np.sum, 7, (0, 0)), (1, 2), {}))
    assert first.needs["numpy"] == NUMPY
    assert finder.of(Seeded(np.sum, 7, (0, 1)), True, dump_task(Seeded(np.sum, 7, (0, 1)), (3, 4), {})) is first


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


def test_a_module_lacked_is_tried_again_once_the_worker_changed_or_after_a_while():
    fit = Fitting()
    env = TaskEnv({"mylib": "1.0"}, frozenset({"mylib"}))
    for peer in ("p1", "p2"):
        fit.heard(peer, "bob", {"mylib": "1.0"}, now=0)
        fit.lacks(peer, "bob", "mylib", now=0)
    fit.heard("p1", "bob", {"mylib": "1.0", "other": None}, now=10)  # the same answer: still lacking
    fit.heard("p2", "bob", {"mylib": "1.0.1"}, now=10)  # reinstalled: worth another try
    assert fit.misfit("p1", env).kind == "missing" and fit.misfit("p2", env) is None
    fit.forget(now=LACK_EXPIRES - 1)
    assert fit.misfit("p1", env).kind == "missing"
    fit.forget(now=LACK_EXPIRES)
    assert fit.misfit("p1", env) is None


def test_a_skewed_worker_is_warned_about_once_however_many_tasks(caplog):
    caplog.set_level(logging.WARNING, logger="p2pexec.client")
    fit = Fitting(strict=True)
    for now in range(5):  # every offer answers again, every task is asked about
        fit.heard("p2", "carol", {"numpy": "1.26.4"}, now=now)
        for _ in range(3):
            assert fit.misfit("p2", TaskEnv({"numpy": "2.1.0"}, frozenset({"numpy"}))).kind == "skew"
    assert len([r for r in caplog.records if "carol" in r.getMessage()]) == 1


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
