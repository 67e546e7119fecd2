"""The worker's history file and the client's notes on unusable workers: pure rules, no processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pexec.protocol.matching import REVISION
from p2pexec.protocol.unusable import DECLINE_EVERY, REMEMBER_SECONDS, DeclineLimiter, Unusable, describe
from p2pexec.status import format_status
from p2pexec.worker.history import Entry, History, format_table, trim

pytestmark = pytest.mark.timeout(120)

lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=30)


@given(lines, st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), st.integers(0, 600))
def test_trim_keeps_the_newest_whole_lines_that_fit(whole, torn, keep):
    data = b"".join(whole) + torn  # a crash may leave the last line torn
    kept = trim(data, keep)
    assert len(kept) <= keep or kept == data and len(data) <= keep
    assert data.endswith(kept)
    start = len(data) - len(kept)
    assert not kept or start == 0 or data[start - 1:start] == b"\n"  # whole lines only
    if start > 0:  # and as many as fit: the line before would not
        previous = data.rfind(b"\n", 0, start - 1) + 1
        assert len(data) - previous > keep


def _entry(i: int, function: str = "mod.fn", outcome: str = "ok") -> Entry:
    return Entry(member="alice", function=function, start=1_700_000_000 + i, seconds=0.5, outcome=outcome,
                 cluster="alice/friends")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12))
def test_the_file_stays_bounded_and_keeps_the_newest_entries(tmp_path_factory, batches):
    path = tmp_path_factory.mktemp("h") / "p2pexec" / "worker-history.jsonl"
    history = History(path, max_bytes=2000, keep_bytes=1000)
    written = 0
    for size in batches:
        history.append([_entry(written + i) for i in range(size)])
        written += size
        assert path.stat().st_size <= 2000
    newest = history.recent(5)
    assert [e.start for e in newest] == [1_700_000_000 + i for i in range(max(0, written - 5), written)]


def test_garbage_and_torn_lines_are_skipped_and_a_missing_file_is_empty(tmp_path):
    path = tmp_path / "h.jsonl"
    history = History(path)
    assert history.recent(10) == []
    history.append([_entry(1)])
    with open(path, "ab") as f:
        f.write(b'not json\n{"member": 1}\n[1]\n{"member":"a","function":"f","start":1,"seconds":1,"outcome":"x"}\n')
        f.write(_entry(2).to_line() + _entry(3).to_line()[:20])  # a torn last line
    assert [e.start for e in history.recent(10)] == [_entry(1).start, _entry(2).start]
    assert history.recent(0) == []


def test_add_batches_and_flush_writes(tmp_path):
    path = tmp_path / "h.jsonl"
    history = History(path)
    history.flush()  # nothing pending: no file
    assert not path.exists()
    history.add(_entry(1))
    history.flush()
    assert [e.start for e in history.recent(5)] == [_entry(1).start]


def test_an_unwritable_history_costs_the_record_not_the_worker(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    history = History(blocker / "sub" / "h.jsonl")  # its directory cannot be made
    history.add(_entry(1))
    history.flush()
    history.add(_entry(2))
    history.flush()
    assert sum("cannot record what ran" in r.getMessage() for r in caplog.records) == 1


def test_the_table_shows_what_members_sent_without_control_characters():
    table = format_table([_entry(1, function="evil\x1b[2J\x07name", outcome="failed")])
    assert "\x1b" not in table and "\x07" not in table and "evil?[2J?name" in table and "failed" in table
    assert format_table([]).startswith("nothing has run")


def test_the_history_names_the_users_function_through_an_executors_wrappers():
    """``initializer=`` and ``seed=`` wrap each task's function, a map wraps it in a chunk runner: the worker's
    history and log name the function the user submitted, not p2pexec's wrapper."""
    import json
    from functools import partial

    from p2pexec.chunks import run_chunks
    from p2pexec.namespaces import Initialized
    from p2pexec.seeding import Seeded
    from p2pexec.worker.taskproc import function_name

    seeded = Seeded(json.dumps, 1, (0,))
    for fn in (json.dumps, seeded, Initialized(seeded, print, "ex"), Initialized(partial(run_chunks, json.dumps),
                                                                                 print, "ex")):
        assert function_name(fn) == "json.dumps"


def test_status_text_has_no_control_characters_from_peers():
    status = {"cluster": "a/b", "board": "ssh://x", "clients": [],
              "workers": [{"user": "friend", "py": "3.11\x1b[31m", "slots": 4, "free": 1, "cores": 8,
                           "memory": 16 << 30, "platform": "linux", "load": 0.5, "reach": "public"}]}
    text = format_status(status)
    assert "\x1b" not in text and "3/4 slots busy" in text and "8 cores, 16.0 GiB" in text


def test_status_points_out_nodes_of_another_release():
    worker = {"slots": 1, "free": 1, "cores": 2, "memory": 1 << 30, "platform": "linux", "py": "3.11"}
    status = {"cluster": "a/b", "board": "ssh://x", "clients": [{"user": "carol", "py": "3.11", "rev": "x"}],
              "workers": [{"user": "bob", **worker, "rev": REVISION}, {"user": "dave", **worker}]}
    lines = format_status(status).splitlines()
    (dave,) = [i for i, line in enumerate(lines) if line.lstrip().startswith("dave")]
    assert lines[dave + 1].strip() == (f"another p2pexec release: wire revision 1, this one's {REVISION} "
                                       "(they cannot work together: upgrade whichever is older)")
    (carol,) = [i for i, line in enumerate(lines) if line.lstrip().startswith("carol")]
    assert "wire revision ?" in lines[carol + 1]
    assert sum("another p2pexec release" in line for line in lines) == 2  # not bob, who runs ours


def test_unusable_workers_are_remembered_while_fresh_and_described_with_advice():
    notes = Unusable("3.11")
    notes.note("friend", "python", "2.7", now=0.0)
    notes.note("bob", "worker-allow", "3.11", now=0.0)
    notes.note("carol", "client-allow", "", now=50.0)
    text = describe(notes.current(now=1.0), "3.11", "alice")
    assert text.index("bob") < text.index("carol") < text.index("friend")
    assert "friend: runs Python 2.7, this client 3.11: start that worker with Python 3.11" in text
    assert "bob: its worker serves only the members in its --allow, not alice: ask bob to add alice" in text
    assert [s.member for s in notes.current(now=REMEMBER_SECONDS + 1)] == ["carol"]
    notes.forget("carol", "client-allow")
    assert notes.current(now=REMEMBER_SECONDS + 1) == []
    with pytest.raises(ValueError):
        notes.note("x", "no-such-reason", "", now=0.0)


def test_declines_are_rate_limited_per_request_in_a_bounded_table():
    limiter = DeclineLimiter()
    assert limiter.due("r1", 0.0) and not limiter.due("r1", DECLINE_EVERY - 1) and limiter.due("r1", DECLINE_EVERY)
    many = [limiter.due(f"req{i}", 100.0) for i in range(1000)]
    assert many.count(True) < 1000  # bounded: a flood of request ids is not all remembered
    assert limiter.due("later", 100.0 + DECLINE_EVERY)  # stale entries make room again


@given(st.text(max_size=30), st.text(max_size=30), st.floats(0, 2e9), st.floats(0, 1e6),
       st.sampled_from(["ok", "failed", "killed"]), st.text(max_size=30))
def test_an_entry_comes_back_from_its_line_with_every_field(member, function, start, seconds, outcome, cluster):
    import dataclasses

    entry = Entry(member, function, start, seconds, outcome, cluster)
    back = Entry.from_line(entry.to_line())
    assert back == dataclasses.replace(entry, start=round(start, 3), seconds=round(seconds, 6))
