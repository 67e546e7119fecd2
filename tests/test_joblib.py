"""joblib's p2pexec backend: Parallel and scikit-learn's n_jobs run on the cluster, same results as n_jobs=1."""

from __future__ import annotations

import pytest

joblib = pytest.importorskip("joblib")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.timeout(180)


def _square(x: int) -> int:
    return x * x


class Odd(Exception):
    pass


def _refuse_odd(x: int) -> int:
    if x % 2:
        raise Odd(x)
    return x


def test_parallel_runs_on_the_cluster_with_auto_batching(executor):
    import os

    with joblib.parallel_config(backend="p2pexec", executor=executor):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(_square)(i) for i in range(2000))
        parents = set(joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getppid)() for _ in range(20)))
    assert out == [i * i for i in range(2000)]
    assert os.getpid() not in parents  # ran in task processes, not here
    assert executor.stats().done < 2000 + 20  # batched: far fewer tasks than calls


def test_a_failing_call_raises_its_own_exception(executor):
    with joblib.parallel_config(backend="p2pexec", executor=executor):
        with pytest.raises(Odd):
            joblib.Parallel(n_jobs=2)(joblib.delayed(_refuse_odd)(i) for i in range(10))


def test_grid_search_gives_the_same_answer_as_one_job(executor):
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10], "gamma": ["scale", 0.01, 0.1]}
    local = GridSearchCV(SVC(), grid, cv=5, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="p2pexec", executor=executor):
        remote = GridSearchCV(SVC(), grid, cv=5, n_jobs=-1).fit(X, y)
    assert remote.best_params_ == local.best_params_
    scores = [key for key in local.cv_results_ if key.endswith("test_score")]
    assert len(scores) == 5 + 3  # split0..4, mean, std, rank
    for key in scores:
        assert list(remote.cv_results_[key]) == list(local.cv_results_[key]), key


def _cluster_arguments(cluster) -> dict[str, str]:
    return dict(cluster=cluster.cluster, board=cluster.board, identity=cluster.identity, members=cluster.members,
                known_hosts=cluster.known_hosts)


def _shut_down(ex) -> bool:
    try:
        ex.submit(abs, -1).cancel()
    except RuntimeError as exc:
        return "shutdown" in str(exc)
    return False


def _square_when_let(port: int, x: int) -> int:
    """``x * x``, at once for 0, else once the test closes its gate (a listening socket on ``port``)."""
    import socket

    if x:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
                conn.recv(1)  # (ends with an error or b"" when the gate closes)
        except OSError:
            pass
    return x * x


def test_a_forest_fits_on_the_cluster_as_it_does_here(executor):
    """Its trees come back as results: sklearn's Tree, rebuilt by calling it, is on the allow-list."""
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    X, y = load_iris(return_X_y=True)
    local = RandomForestClassifier(n_estimators=8, random_state=0, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="p2pexec", executor=executor):
        remote = RandomForestClassifier(n_estimators=8, random_state=0, n_jobs=2).fit(X, y)
    assert executor.stats().done >= 2  # (it ran there)
    assert (remote.predict_proba(X) == local.predict_proba(X)).all()


def test_cluster_arguments_open_and_close_an_executor(cluster):
    """Open while a call has results to come (joblib closes a backend once every task is done, even if
    results are still to be read), closed after it."""
    import socket
    from functools import partial

    with joblib.parallel_config(backend="p2pexec", **_cluster_arguments(cluster)):
        backend, _ = joblib.parallel.get_active_backend()
        with socket.create_server(("127.0.0.1", 0)) as gate:
            square = partial(_square_when_let, gate.getsockname()[1])
            results = joblib.Parallel(n_jobs=2, return_as="generator")(joblib.delayed(square)(i) for i in range(5))
            first = next(results)
            opened = backend._executor  # (the backend's own attribute: joblib has no way to ask)
            assert opened is not None and not _shut_down(opened)
        assert [first, *results] == [0, 1, 4, 9, 16]
    assert backend._executor is None and _shut_down(opened)


def test_n_jobs_minus_one_with_cluster_arguments_counts_before_the_first_parallel_call(cluster):
    """scikit-learn asks effective_n_jobs(-1) before it calls Parallel: the executor opens then, and that
    Parallel call uses it and closes it."""
    with joblib.parallel_config(backend="p2pexec", **_cluster_arguments(cluster)):
        assert joblib.effective_n_jobs(-1) == 2  # (the session cluster: 2 workers, 1 slot each)
        backend, _ = joblib.parallel.get_active_backend()
        opened = backend._executor
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(_square)(i) for i in range(3)) == [0, 1, 4]
    assert opened is not None and _shut_down(opened)


def test_the_older_parallel_backend_works_too(executor):
    with joblib.parallel_backend("p2pexec", executor=executor):
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(_square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
        assert joblib.effective_n_jobs(-1) == 2


def test_a_joblib_outside_the_tested_range_is_refused_by_name(monkeypatch):
    """The backend builds on joblib's private API: another joblib fails at parallel_config, saying which it needs."""
    import re

    from p2pexec.joblib_backend import JOBLIB_RANGE

    monkeypatch.setattr(joblib, "__version__", "1.4.2")
    with pytest.raises(ImportError, match=re.escape(f"joblib{JOBLIB_RANGE}, not joblib 1.4.2")):
        joblib.parallel_config(backend="p2pexec", cluster="alice/friends")
    with pytest.raises(ImportError, match=re.escape(f"pip install 'joblib{JOBLIB_RANGE}'")):
        joblib.parallel_backend("p2pexec", cluster="alice/friends")


@pytest.mark.parametrize("order", ["import p2pexec, joblib", "import joblib, p2pexec"])
def test_the_backend_is_there_whichever_is_imported_first(order):
    import subprocess
    import sys

    code = f"{order}\nfrom joblib.parallel import BACKENDS\nprint('p2pexec' in BACKENDS)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "True"


def _nested(x: int, *, scale: int = 1) -> tuple[int, str]:
    backend, _ = joblib.parallel.get_active_backend()
    inner = joblib.Parallel(n_jobs=2)(joblib.delayed(_square)(i) for i in range(3))
    return x * scale + sum(inner), type(backend).__name__


def test_batches_keep_keyword_arguments_and_joblibs_nested_backend(executor):
    """Batches of one function travel as the function plus C-pickled arguments; they must run exactly
    as joblib's own BatchedCalls would, nested Parallel calls included."""
    with joblib.parallel_config(backend="p2pexec", executor=executor):
        out = joblib.Parallel(n_jobs=2, batch_size=4)(joblib.delayed(_nested)(i, scale=10) for i in range(8))
        mixed = joblib.Parallel(n_jobs=2, batch_size=4)(
            joblib.delayed(_square if i % 2 else abs)(i) for i in range(8))
    assert [value for value, _ in out] == [10 * i + 5 for i in range(8)]
    assert {name for _, name in out} <= {"SequentialBackend", "ThreadingBackend"}
    assert mixed == [i * i if i % 2 else i for i in range(8)]


def test_n_jobs_minus_one_counts_every_worker_that_answers(cluster):
    with cluster.executor() as ex, joblib.parallel_config(backend="p2pexec", executor=ex):
        assert joblib.effective_n_jobs(-1) == 2  # (the session cluster: 2 workers, 1 slot each)
