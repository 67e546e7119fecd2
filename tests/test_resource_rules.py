"""The pure resource rules: sizes, needs, what workers lend, and the worker's reservations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pexec.protocol.resources import (ANY, Gpu, Need, Reservations, Resources, format_size, gpu_list,
                                        lent_twice, parse_size, unmet)
from p2pexec.status import format_status

GiB = 1 << 30


@pytest.mark.parametrize("text, size", [("8GiB", 8 * GiB), ("512MiB", 512 << 20), ("2G", 2 * GiB), ("1.5 GB", 3 << 29),
                                        ("1048576", 1 << 20), ("64k", 64 << 10), (4096, 4096)])
def test_sizes_read_as_people_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "1XB", "GiB", True, 0, -5])
def test_a_bad_size_says_what_a_size_looks_like(text):
    with pytest.raises(ValueError):
        parse_size(text)


tags = st.frozensets(st.from_regex(r"[a-z0-9_.+-]{1,8}", fullmatch=True), max_size=4)
needs = st.builds(Need, st.none() | st.integers(1, 1 << 40), st.none() | st.integers(1, 64), st.integers(0, 4), tags)
gpus = st.lists(st.builds(Gpu, st.integers(0, 15), st.text(max_size=20), st.integers(0, 1 << 36)), max_size=4)
lent = st.builds(Resources, st.integers(1, 8), st.integers(1, 64), st.integers(1, 1 << 40), gpus.map(tuple), tags,
                 st.sampled_from(["linux", "darwin"]), st.sampled_from(["x86_64", "arm64"]), st.just("3.11.7"),
                 st.booleans())


@given(needs)
def test_a_need_survives_its_message(need):
    assert Need.from_json(need.to_json()) == need


@given(lent)
def test_what_a_worker_lends_survives_its_message(resources):
    assert Resources.from_json(resources.to_json()) == resources


@pytest.mark.parametrize("garbage", [None, [], {"memory": "x"}, {"gpus": -1}, {"disk": 1}, {"tags": "big"},
                                     {"tags": ["a b"]}, {"cores": True}])
def test_a_garbled_need_is_refused(garbage):
    with pytest.raises((ValueError, TypeError)):
        Need.from_json(garbage)


def test_unmet_names_the_first_requirement_a_worker_lacks():
    box = Resources(2, 4, 8 * GiB, (Gpu(0, "T4", 16 * GiB),), frozenset({"ssd"}))
    assert unmet(ANY, box) is None
    assert unmet(Need(memory=8 * GiB, cores=4, gpus=1, tags=frozenset({"ssd"})), box) is None
    assert "memory=16 GiB: it lends 8 GiB" in unmet(Need(memory=16 * GiB), box)
    assert "cores=5: it has 4" in unmet(Need(cores=5), box)
    assert "gpus=2: its slots see at most 1" in unmet(Need(gpus=2), box)
    assert "tags {gpu-box}" in unmet(Need(tags=frozenset({"gpu-box", "ssd"})), box)


def test_gpus_are_dealt_between_slots_so_none_is_seen_twice():
    box = Resources(3, 8, GiB, tuple(Gpu(i) for i in range(5)))
    seen = [gpu.index for slot in range(3) for gpu in box.gpus_of(slot)]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert [len(box.gpus_of(s)) for s in range(3)] == [2, 2, 1]


def test_gpus_to_share_are_all_none_or_listed():
    found = (Gpu(0, "A100", 40 * GiB), Gpu(1, "A100", 40 * GiB))
    assert gpu_list("all", found) == found and gpu_list("none", found) == ()
    assert gpu_list("1", found) == (found[1],) and gpu_list("3", ()) == (Gpu(3),)
    for bad in ("x", "0,0", "-1"):
        with pytest.raises(ValueError):
            gpu_list(bad, found)


def test_status_shows_what_each_worker_lends():
    res = Resources(2, 8, 16 * GiB, (Gpu(0, "RTX 4090", 24 * GiB),), frozenset({"big"}), "linux", "aarch64", "3.12")
    text = format_status({"cluster": "a/b", "board": "x", "clients": [],
                          "workers": [{"user": "bob", "slots": 2, "free": 2, "cores": 8, "res": res.to_json(),
                                       "py": "3.12", "platform": "linux"}]})
    assert "16 GiB lent (8 GiB per slot), 1 GPU(s): RTX 4090 24 GiB, tags big" in text
    assert "python 3.12  linux/aarch64" in text
    assert format_size(3 << 29) == "1.5 GiB"


class ReservationMachine(RuleBasedStateMachine):
    """Leases come and go with random needs: the worker never promises more than it has."""

    def __init__(self) -> None:
        super().__init__()
        self.box = Resources(4, 4, 8 * GiB, (Gpu(0), Gpu(1)), memory_capped=True)
        self.ledger = Reservations(self.box)
        self.leases: dict[str, tuple[Need, tuple[int, ...]]] = {}
        self.count = 0

    @rule(need=st.builds(Need, st.none() | st.sampled_from([GiB, 2 * GiB, 3 * GiB, 9 * GiB]),
                         st.none() | st.integers(1, 5), st.integers(0, 2)),
          slots=st.integers(1, 5))
    def lease(self, need: Need, slots: int) -> None:
        available = self.ledger.available(need)
        self.count += 1
        name = f"lease{self.count}"
        held = self.ledger.reserve(name, need, slots)
        if slots <= available:
            assert held is not None and len(held) == slots
            self.leases[name] = (need, held)
        else:
            assert held is None

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.leases)))
        del self.leases[name]
        self.ledger.release(name)

    @invariant()
    def never_over_committed(self) -> None:
        slots = [s for _, held in self.leases.values() for s in held]
        assert len(slots) == len(set(slots)) and set(slots) == set(self.ledger.busy)
        assert sum(self.ledger.memory_of(need) * len(held) for need, held in self.leases.values()) <= self.box.memory
        assert sum((need.cores or 1) * len(held) for need, held in self.leases.values()) <= 4
        for need, held in self.leases.values():
            assert all(len(self.box.gpus_of(s)) >= need.gpus for s in held)
            assert self.ledger.limit_of(need) == (need.memory or 2 * GiB)


TestReservations = ReservationMachine.TestCase
TestReservations.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_a_machine_without_an_nvidia_driver_lends_no_gpus_and_nothing_breaks():
    """nvidia-ml-py is installed with the test extra; this machine has no driver, so NVML fails to start."""
    from p2pexec.worker.gpus import detect

    pytest.importorskip("pynvml")
    assert detect() == ()


def test_what_two_workers_on_one_machine_lend_twice_is_named_with_the_flag_that_splits_it():
    a100 = [Gpu(i, "A100", 40 << 30) for i in range(3)]
    mine, theirs = Resources(1, 8, 16 << 30, tuple(a100[:2])), Resources(1, 8, 8 << 30, (a100[1],))
    assert lent_twice(mine, {"the worker for bob/lab (pid 7)": theirs}, 16 << 30) == [
        "GPU 1 is lent by the worker for bob/lab (pid 7) too: restart one of them with --gpus so that each lends "
        "its own (a worker started before the other is not told)",
        "this machine has 16 GiB of memory and its workers lend 24 GiB in all (this one 16 GiB, the worker for "
        "bob/lab (pid 7) 8 GiB): restart one of them with --memory so that they lend at most that"]
    assert lent_twice(Resources(1, 8, 8 << 30, (a100[0],)), {"x": theirs}, 16 << 30) == []  # split: nothing twice
    assert lent_twice(mine, {}, 16 << 30) == []
    [gpus] = lent_twice(Resources(1, 8, 1, tuple(a100)), {"x": Resources(1, 8, 1, tuple(a100[1:]))}, 0)
    assert gpus.startswith("GPU 1, 2 are lent by x too")  # (and the machine's memory unknown: not compared)
