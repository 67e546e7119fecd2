"""A task's log records are handled by the client's loggers, under the client's logging config; whatever a
worker sends, the client makes no logger of it and does not fail."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pexec import task_logs

pytestmark = pytest.mark.timeout(120)


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept():
    logger, handler = logging.getLogger("p2pexec_test_app"), Kept()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def chatty(n: int) -> int:
    log = logging.getLogger("p2pexec_test_app.jobs")  # (the client has no logger of this name)
    log.debug("not sent")
    log.info("task %d starting", n)
    try:
        raise KeyError(n)
    except KeyError:
        log.exception("task %d failed", n)
    return n


def test_a_tasks_records_reach_the_clients_handlers_as_the_client_set_them(executor, kept):
    assert executor.submit(chatty, 3).result(timeout=60) == 3
    got = [(r.name, r.levelname, r.getMessage()) for r in kept.records]
    assert got == [("p2pexec_test_app.jobs", "INFO", "task 3 starting"), ("p2pexec_test_app.jobs", "ERROR", "task 3 failed")]
    assert "KeyError: 3" in kept.records[1].exc_text and kept.records[1].funcName == "chatty"
    assert kept.records[0].worker.startswith(executor.submit(_member).result(timeout=60) + "/local-")


def _member() -> str:
    from p2pexec import current_worker

    return current_worker().member


def test_recorded_here_and_replayed_there_round_trip(kept):
    recorder, root = task_logs.Recorder(), logging.getLogger("p2pexec_test_root")
    root.addHandler(recorder)
    root.setLevel(logging.INFO)
    try:
        logging.getLogger("p2pexec_test_root.x").warning("%s and %s", "this", "that")
        root.info("kept with its place")
    finally:
        root.removeHandler(recorder)
    records = recorder.take()
    assert [r[2] for r in records] == ["this and that", "kept with its place"] and recorder.take() == ()
    renamed = tuple(("p2pexec_test_app" + r[0][len("p2pexec_test_root"):], *r[1:]) for r in records)
    task_logs.replay(renamed, "bob/laptop")
    assert [(r.name, r.getMessage(), r.worker) for r in kept.records] == [
        ("p2pexec_test_app.x", "this and that", "bob/laptop"), ("p2pexec_test_app", "kept with its place", "bob/laptop")]


def test_a_task_that_logs_without_end_keeps_a_bounded_number_and_says_how_many_went():
    recorder = task_logs.Recorder()
    for i in range(task_logs.KEPT_RECORDS + 5):
        recorder.handle(logging.LogRecord("x", logging.INFO, "", 0, "line %d", (i,), None))
    records = recorder.take()
    assert len(records) == task_logs.KEPT_RECORDS + 1 and "5 more log records" in records[-1][2]


junk = st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=300) | st.binary(max_size=10),
                    lambda inner: st.lists(inner, max_size=10).map(tuple), max_leaves=40)


well_formed = st.tuples(st.text(max_size=250), st.integers(-5, 120), st.text(), st.floats(),
                        st.text(), st.integers(), st.text(), st.text(), st.text())


@given(st.lists(junk | well_formed, max_size=5).map(tuple) | junk)
def test_whatever_a_worker_sends_as_records_makes_no_logger_and_never_fails(records):
    before = set(logging.Logger.manager.loggerDict)
    task_logs.replay(records, "mallory/box")
    assert set(logging.Logger.manager.loggerDict) == before


def test_the_client_holds_a_worker_to_the_limits_and_keeps_p2pexecs_loggers_its_own(kept):
    """One record named a million times in a pickle costs the worker nothing to send: the client counts."""
    record = ("p2pexec_test_app", logging.ERROR, "x" * 1000, 1.0, "", 0, "", "", "")
    task_logs.replay((record,) * 200_000, "mallory/box")
    assert len(kept.records) == task_logs.KEPT_RECORDS + 1
    kept.records.clear()
    task_logs.replay((("p2pexec_test_app", 40, "y" * 100_000, 1.0, "", 0, "", "", ""),) * 1000, "mallory/box")
    assert sum(len(r.getMessage()) for r in kept.records) <= task_logs.KEPT_TOTAL
    kept.records.clear()
    forged = logging.getLogger("p2pexec.client")
    spy = Kept()
    forged.addHandler(spy)
    try:
        task_logs.replay((("p2pexec.client", logging.ERROR, "forged", 1.0, "", 0, "", "", ""),
                          ("p2pexec_test_app", logging.ERROR, "when", float("inf"), "", 0, "", "", "")), "mallory/box")
    finally:
        forged.removeHandler(spy)
    assert spy.records == [] and kept.records == []


def failing_filter(record: logging.LogRecord) -> bool:
    raise AttributeError("request_id")  # a filter of the client's that expects its own extra= field


def test_a_client_handler_that_fails_on_a_tasks_record_leaves_no_future_pending(executor, kept):
    logger = logging.getLogger("p2pexec_test_app")
    logger.addFilter(failing_filter)
    try:
        assert executor.submit(chatty, 4).result(timeout=60) == 4
        assert executor.submit(chatty, 5).result(timeout=60) == 5  # and the lease carries on
    finally:
        logger.removeFilter(failing_filter)
