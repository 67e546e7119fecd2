"""The client's core on its own: no board, sockets, threads or clock, so each decision is checked directly,
and a hypothesis state machine drives it with random submits, offers, answers, losses, cancels, bans
and ticks against a model of where every task is."""

from __future__ import annotations

import itertools
from concurrent.futures import Future

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pexec.client_core import END, IDLE, WAIT, ClientCore
from p2pexec.client_state import (
    Action, Cancel, Dial, EndLease, Fail, LeaseState, Post, SchedulerOptions, Warn, WorkItem,
)
from p2pexec.errors import NoWorkersError, ProtocolError, WorkerLostError
from p2pexec.fitting import Fitting
from p2pexec.protocol import messages
from p2pexec.protocol.frames import Op, decode_ops
from p2pexec.protocol.matching import REVISION
from p2pexec.protocol.resources import ANY, Need, Resources
from p2pexec.stdlib_private import cancel_running

PY = "3.11"
BIG = Need.of(tags={"big"})
_ids = itertools.count(1)


def core(**options) -> ClientCore:
    c = ClientCore("me", "me/c", SchedulerOptions(**{"max_workers": 8, **options}), Fitting())
    c.python = PY
    return c


def submit(c: ClientCore, need: Need = ANY, now: float = 0.0) -> WorkItem:
    item = WorkItem(Future(), [b"task"], next(_ids), need=need, since=now)
    c.pending.append(item)
    return item


def requests(actions: list[Action]) -> list[Post]:
    return [a for a in actions if isinstance(a, Post) and a.mtype == "request"]


def offer(req: str, sender: str = "bob", peer: str = "peer-bob", slots: int = 2, py: str = PY,
          to: str = "me", need: Need = ANY, **extra: object) -> messages.Message:
    body = {"req": req, "to": to, "slots": slots, "py": py, "rev": REVISION, "peer": peer, "addrs": [], "kx": "",
            **extra}
    if need != ANY:
        body["res"] = Resources(slots=slots, cores=4, memory=1 << 30, tags=need.tags).to_json()
    return messages.Message("offer", sender, b"key-" + sender.encode(), "me/c", messages.new_id(), 0.0, 1e9, body)


def dials(actions: list[Action]) -> list[LeaseState]:
    return [a.lease for a in actions if isinstance(a, Dial)]


def lease_of(c: ClientCore, sender: str = "bob", slots: int = 2, credits: int = 2) -> LeaseState:
    """An open lease of ``sender`` on the plain need, with ``credits`` granted."""
    (lease,) = dials(c.on_message(offer(c.request_id, sender, f"peer-{sender}", slots), 0.0))
    lease.open, lease.credits = True, credits
    return lease


def settle(actions: list[Action]) -> None:
    """What the adapter does with the futures."""
    for action in actions:
        if isinstance(action, Fail) and not action.item.future.done():
            action.item.future.set_exception(action.error)
        elif isinstance(action, Cancel):
            cancel_running(action.item.future) if action.item.started else action.item.future.cancel()


def test_demand_is_asked_for_at_once_when_it_doubles_and_withdrawn_when_gone():
    c = core()
    assert requests(c.maybe_request(0.0)) == []
    submit(c)
    (first,) = requests(c.maybe_request(0.0))
    assert first.body["n"] == 1 and first.body["req"] == c.request_id and first.body["py"] == PY
    submit(c)
    assert [r.body["n"] for r in requests(c.maybe_request(0.1))] == [2]  # doubled: at once
    submit(c)
    assert requests(c.maybe_request(0.2)) == []  # 3 < 2 * 2: waits for REQUEST_EVERY
    assert [r.body["n"] for r in requests(c.maybe_request(2.2))] == [3]
    while c.pending:
        c.pending.popleft()
    assert c.maybe_request(2.3) == [Post("withdraw", {"req": c.request_id}, 10.0)]
    assert c.maybe_request(2.4) == []  # withdrawn once


def test_offers_are_leased_up_to_the_work_and_max_workers():
    c = core(max_workers=3)
    for _ in range(5):
        submit(c)
    (lease,) = dials(c.on_message(offer(c.request_id, slots=2), 0.0))
    assert (lease.worker, lease.peer, lease.slots, lease.key) == ("bob", "peer-bob", 2, b"key-bob")
    (second,) = dials(c.on_message(offer(c.request_id, "carol", "peer-carol", slots=4), 0.0))
    assert second.slots == 1  # max_workers=3
    assert dials(c.on_message(offer(c.request_id, "dave", "peer-dave"), 0.0)) == []
    assert c.capacity(0.0) == 5  # leased, and dave's slots offered


def test_offers_not_for_us_or_from_workers_we_may_not_use_are_ignored():
    c = core(allow=frozenset({"bob", "carol", "mallory"}))
    submit(c)
    c.ban("mallory", "sent garbage")
    assert dials(c.on_message(offer("someone-elses-request"), 0.0)) == []
    assert dials(c.on_message(offer(c.request_id, to="you"), 0.0)) == []
    assert dials(c.on_message(offer(c.request_id, "mallory", "new-peer-of-mallory"), 0.0)) == []
    assert dials(c.on_message(offer(c.request_id, "dave", "peer-dave"), 0.0)) == []  # not in allow=
    assert dials(c.on_message(offer(c.request_id, py="3.0"), 0.0)) == []
    c.dial_failed("carol", "peer-carol", "no route", 0.0)
    assert dials(c.on_message(offer(c.request_id, "carol", "peer-carol"), 1.0)) == []  # backing off
    assert dials(c.on_message(offer(c.request_id, "carol", "peer-carol"), 2.0)) != []
    hint = c.starving_hint(2.0)
    assert "mallory" in hint and "dave" in hint and "carol" in hint


def test_a_worker_of_another_release_is_never_leased_and_the_hint_says_to_upgrade():
    """Friends upgrade on different days: a worker that would misread our frames is named, not dialed."""
    c = core()
    submit(c)
    assert dials(c.on_message(offer(c.request_id, rev=REVISION + 1), 0.0)) == []
    older = offer(c.request_id, "carol", "peer-carol")
    del older.body["rev"]  # releases before the field was sent
    assert dials(c.on_message(older, 0.0)) == []
    assert dials(c.on_message(offer(c.request_id, "erin", "peer-erin", rev="2"), 0.0)) == []  # garbled
    declined = messages.Message("decline", "dave", b"key-dave", "me/c", messages.new_id(), 0.0, 1e9,
                                {"req": c.request_id, "to": "me", "why": "version", "rev": 7})
    c.on_message(declined, 0.0)
    hint = c.starving_hint(1.0)
    assert (f"bob: runs p2pexec wire revision {REVISION + 1}, this client {REVISION}, and the two never work "
            "together: upgrade p2pexec here (pip install -U p2pexec)") in hint
    assert (f"carol: runs p2pexec wire revision 1, this client {REVISION}, and the two never work together: ask "
            "carol to upgrade p2pexec there (pip install -U p2pexec) and restart the worker") in hint
    assert "erin: runs p2pexec wire revision ?" in hint and "upgrade whichever is older" in hint
    assert "dave: runs p2pexec wire revision 7" in hint
    assert dials(c.on_message(offer(c.request_id, "frank", "peer-frank"), 1.0)) != []  # our revision: leased


def test_an_offer_for_a_need_must_meet_it_and_leases_serve_only_their_need():
    c = core()
    plain, big = submit(c), submit(c, BIG)
    req = requests(c.maybe_request(0.0))
    big_req = next(r.body["req"] for r in req if r.body.get("need") == BIG.to_json())
    assert dials(c.on_message(offer(big_req), 0.0)) == []  # says nothing of tags
    (lease,) = dials(c.on_message(offer(big_req, need=BIG), 0.0))
    lease.open, lease.credits = True, 5
    assert c.take(lease, 0.0) is big and c.take(lease, 0.0) is None
    assert list(c.pending) == [plain]


def test_credits_bound_what_a_lease_holds_and_idle_slots_fill_before_any_queues():
    c = core()
    items = [submit(c) for _ in range(6)]
    one = lease_of(c, "bob", slots=1, credits=3)
    two = lease_of(c, "carol", slots=1, credits=3)
    assert c.take(one, 0.0) is items[0]
    assert c.take(one, 0.0) is None  # carol's slot idles: no queueing behind bob's task
    assert c.take(two, 0.0) is items[1]
    assert [c.take(one, 0.0), c.take(one, 0.0), c.take(one, 0.0)] == [items[2], items[3], None]  # credits out
    assert list(one.inflight.values()) == items[0:1] + items[2:4] and one.credits == 0
    assert items[0].ran_on == ("bob", "peer-bob", "") and items[0].future.running()


def test_with_task_timeout_no_task_waits_behind_a_busy_slot_on_its_worker():
    """Its clock starts when it is sent: queued behind a long task, it ran out without ever running."""
    c = core(task_timeout=5.0)
    items = [submit(c) for _ in range(3)]
    lease = lease_of(c, "bob", slots=1, credits=3)
    assert c.take(lease, 0.0) is items[0] and c.take(lease, 0.0) is None  # no other lease: it waits here
    lease.answered(items[0].id)
    assert c.take(lease, 1.0) is items[1] and items[1].deadline == 6.0


def test_lost_tasks_run_again_until_max_retries_then_fail():
    c = core(max_retries=1)
    item = submit(c)
    for attempt in (1, 2):
        lease = lease_of(c)
        assert c.take(lease, 0.0) is item
        settle(c.lease_ended(lease, "connection reset", True, "12:00:00", 0.0))
        assert len(item.losses) == attempt
    assert not c.pending
    with pytest.raises(WorkerLostError, match="lost with its worker 2 times: bob at 12:00:00 .connection reset"):
        item.future.result(0)


def test_a_lease_ended_in_good_order_or_a_task_returned_is_no_loss():
    c = core(max_retries=0)
    first, second = submit(c), submit(c)
    lease = lease_of(c)
    assert c.take(lease, 0.0) is first and c.take(lease, 0.0) is second
    assert c.returned(lease, first.id) == [] and lease.credits == 0
    settle(c.lease_ended(lease, None, True, "12:00:00", 0.0))
    assert list(c.pending) == [second, first] and first.losses == second.losses == []  # each back at the front


def test_a_worker_that_answers_what_it_was_not_asked_keeps_the_task_which_then_runs_elsewhere():
    c = core()
    item = submit(c)
    lease = lease_of(c)
    c.take(lease, 0.0)
    with pytest.raises(ProtocolError, match="answered unknown task"):
        lease.answered(item.id + 1000)
    with pytest.raises(ProtocolError, match="nobody asked"):
        lease.cancelled(item.id)
    with pytest.raises(ProtocolError, match="needs module"):
        c.missing(lease, item.id, "not a module", 0.0)
    assert lease.inflight == {item.id: item}
    settle(c.lease_ended(lease, "broke the protocol", True, "12:00:00", 0.0))
    assert list(c.pending) == [item]


def test_a_missing_module_sends_the_task_to_a_worker_that_has_it_and_a_lease_with_none_left_ends():
    c = core()
    item, other = submit(c), submit(c)
    bob, carol = lease_of(c, "bob", slots=1, credits=3), lease_of(c, "carol", slots=1)
    assert c.take(bob, 0.0) is item
    assert c.missing(bob, item.id, "numpy", 0.0) == [] and "numpy" in item.env.modules
    assert c.take(bob, 0.0) is other and list(c.pending) == [item]  # passed over, still first
    bob.answered(other.id)
    assert c.take(bob, 0.0) is None and bob.stuck and c.feeding(bob) == END
    assert c.take(carol, 0.0) is item


def test_a_slot_the_worker_gives_away_is_no_longer_filled_and_is_wanted_again():
    c = core()
    items = [submit(c) for _ in range(6)]
    bob, carol = lease_of(c, "bob", slots=2, credits=4), lease_of(c, "carol", slots=1, credits=4)
    assert c.take(bob, 0.0) is items[0]  # (bob's other slot would take the next one)
    wanted = c.wanted(ANY)
    c.slots_taken(bob, 1, 1.0)  # fair sharing gave bob's other slot to someone who waited
    assert bob.slots == 1 and c.wanted(ANY) == wanted + 1
    assert c.take(bob, 1.0) is None  # bob's one slot is busy and carol's idle: carol's is filled first
    assert c.take(carol, 1.0) is items[1]
    assert c.take(bob, 1.0) is items[2]  # every slot busy: now it queues behind one
    for slots in (1, 2, 0):  # a lease only ever loses slots, and keeps one
        with pytest.raises(ProtocolError, match="slot"):
            c.slots_taken(bob, slots, 1.0)
    assert bob.slots == 1


def test_an_idle_lease_waits_unless_work_of_another_need_has_no_lease():
    c = core()
    item = submit(c)
    lease = lease_of(c)
    assert c.feeding(lease) == WAIT  # work waits for it
    c.take(lease, 0.0)
    assert c.feeding(lease) == WAIT  # holds a task
    lease.answered(item.id)
    assert c.feeding(lease) == IDLE
    submit(c, BIG)
    assert c.feeding(lease) == END  # its slots go to the starving need
    c.close(0.0)
    assert c.feeding(lease) == END


def test_interrupting_and_withdrawing_reach_every_task_wherever_it_is():
    c = core()
    queued, sent, other = submit(c), submit(c), submit(c)
    lease = lease_of(c, credits=1)
    assert c.take(lease, 0.0) is queued
    actions = c.interrupt(queued.future)
    assert Cancel(queued) in actions and queued.cancel_asked
    assert [op for op, arg, _, _ in decode_ops(b"".join(lease.control))] == [Op.INTERRUPT]
    settle(actions)
    assert queued.future.cancelled()
    settle(c.interrupt(sent.future))
    assert sent.future.cancelled() and list(c.pending) == [other]
    with pytest.raises(ValueError):
        c.interrupt(Future())
    settle(c.withdraw_queued())
    assert other.future.cancelled() and not c.pending


def test_no_worker_warns_when_news_changes_then_fails_with_the_command_to_run():
    c = core(warn_after=30, worker_timeout=60)
    item = submit(c)
    assert not [a for a in c.tick(0.0) if isinstance(a, Warn)]
    (warning,) = [a for a in c.tick(31.0) if isinstance(a, Warn)]
    assert "no worker has run tasks for cluster me/c in 31 s; a member must run: p2pexec-worker" in warning.text
    assert not [a for a in c.tick(40.0) if isinstance(a, Warn)]  # same news: said once
    c.on_message(offer(c.request_id, py="3.0"), 41.0)  # news: bob's worker runs another Python
    assert [a for a in c.tick(46.0) if isinstance(a, Warn)]
    settle(c.tick(61.0))
    with pytest.raises(NoWorkersError, match="within 60 s"):
        item.future.result(0)


def test_worker_timeout_runs_for_each_task_from_when_it_began_waiting():
    """A task submitted just after another need's ran out of time failed with it, though it had waited for
    nothing (a test's second task, under load, before its lease opened); so did a later task of the same
    need."""
    c = core(worker_timeout=6)
    huge = submit(c, Need(memory=1 << 46))
    settle(c.tick(0.0))
    huge_later = submit(c, Need(memory=1 << 46), now=5.9)
    plain = submit(c, ANY, now=6.0)
    settle(c.tick(6.0))
    assert isinstance(huge.future.exception(0), NoWorkersError)
    assert not plain.future.done() and not huge_later.future.done()
    settle(c.tick(11.9))
    assert not plain.future.done()
    settle(c.tick(12.0))
    for item in (huge_later, plain):
        with pytest.raises(NoWorkersError, match="within 6 s"):
            item.future.result(0)


def test_task_timeout_fails_the_task_then_ends_a_worker_that_does_not_stop_it():
    c = core(task_timeout=5.0)
    item = submit(c)
    lease = lease_of(c)
    c.take(lease, 100.0)
    assert c.tick(104.0) == []
    actions = c.tick(105.0)
    settle(actions)
    assert isinstance(item.future.exception(0), TimeoutError) and item.cancel_asked
    (end,) = [a for a in c.tick(115.0) if isinstance(a, EndLease)]
    assert end.lease is lease and "did not stop task" in str(end.error)


# -- the state machine ------------------------------------------------------------------------

WORKERS = ("alice", "bob", "carol", "mallory")


class ClientMachine(RuleBasedStateMachine):
    """Random events against the core; the model knows each task's future and which lease was sent what."""

    @initialize(max_workers=st.integers(1, 4), max_retries=st.integers(0, 2),
                task_timeout=st.sampled_from([None, 5.0]), allow=st.sampled_from([None, ("alice", "bob", "carol")]),
                queued=st.integers(0, 6))
    def start(self, max_workers, max_retries, task_timeout, allow, queued: int) -> None:
        self.core = core(max_workers=max_workers, max_retries=max_retries, task_timeout=task_timeout,
                         worker_timeout=None, shutdown_timeout=20.0, allow=None if allow is None else frozenset(allow))
        self.now = 0.0
        self.items: list[WorkItem] = []
        self.asked: dict[str, Need] = {self.core.request_id: ANY}  # request id -> its need, as posted
        self.granted: dict[LeaseState, int] = {}  # credits granted per lease
        self.sent: dict[LeaseState, int] = {}  # tasks sent per lease
        self.banned_at: dict[str, float] = {}
        self.closed = False
        if queued:
            self.submit(ANY, queued)

    def do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Post) and action.mtype == "request":
                assert not self.closed, "asked for workers after close"
                self.asked[action.body["req"]] = Need.from_json(action.body.get("need", {}))
            elif isinstance(action, Dial):
                worker = action.lease.worker
                assert worker not in self.banned_at, f"leased {worker}, who was banned"
                assert self.core.options.allow is None or worker in self.core.options.allow
                assert action.offer["py"] == PY
                self.granted[action.lease] = self.sent[action.lease] = 0
            elif isinstance(action, EndLease):
                self.end(action.lease, str(action.error), ban=True)
        settle(actions)

    def end(self, lease: LeaseState, reason: str | None, ban: bool = False) -> None:
        if lease not in self.core.leases:
            return
        if ban:
            self.ban(lease.worker)
        self.do(self.core.lease_ended(lease, reason, True, "12:00:00", self.now))
        assert not lease.inflight

    def leases(self, opened: bool = True) -> list[LeaseState]:
        return [lease for lease in self.core.leases if lease.open == opened]

    @rule(need=st.sampled_from([ANY, ANY, BIG]), n=st.integers(1, 4))
    def submit(self, need: Need, n: int) -> None:
        self.items += [submit(self.core, need, self.now) for _ in range(n)]
        self.do(self.core.maybe_request(self.now))

    @rule(data=st.data(), worker=st.sampled_from(WORKERS), slots=st.integers(1, 3), py=st.sampled_from([PY, PY, "3.0"]),
          reached=st.sampled_from([True, True, None]), credits=st.integers(0, 3))
    def offer(self, data, worker: str, slots: int, py: str, reached: bool | None, credits: int) -> None:
        """An offer comes; a lease it starts is reached at once and fed what it is ``credits``, or later
        (``None``: see :meth:`dialed`)."""
        req = data.draw(st.sampled_from(list(self.asked)))  # (in the order posted: the ids are random)
        peer = f"peer-{worker}-{data.draw(st.integers(0, 1))}"
        before = list(self.core.leases)
        self.do(self.core.on_message(offer(req, worker, peer, slots, py, need=self.asked[req]), self.now))
        for lease in [lease for lease in self.core.leases if lease not in before]:
            if reached:
                self.core.dial_reached(lease.worker, lease.peer)
                lease.open = True
                self.feed(lease, credits)

    @precondition(lambda self: self.leases(opened=False))
    @rule(data=st.data(), reached=st.booleans())
    def dialed(self, data, reached: bool) -> None:
        lease = data.draw(st.sampled_from(self.leases(opened=False)))
        if reached:
            self.core.dial_reached(lease.worker, lease.peer)
            lease.open = True
        else:
            self.core.dial_failed(lease.worker, lease.peer, "no route", self.now)
            self.do(self.core.lease_ended(lease, "unreachable", False, "12:00:00", self.now))

    @precondition(lambda self: self.leases())
    @rule(data=st.data(), credits=st.integers(1, 4))
    def credit(self, data, credits: int) -> None:
        self.feed(data.draw(st.sampled_from(self.leases())), credits)

    def feed(self, lease: LeaseState, credits: int) -> None:
        """The worker grants ``credits``; the lease's feeder sends what the core gives it."""
        lease.credits += credits
        self.granted[lease] += credits
        while (item := self.core.take(lease, self.now)) is not None:
            held = [other for other in self.core.leases if other is not lease and item.id in other.inflight]
            assert not held and item not in list(self.core.pending), "a task sent twice"
            assert item.need == lease.need and lease.inflight[item.id] is item
            self.sent[lease] += 1

    @precondition(lambda self: any(lease.inflight for lease in self.leases()))
    @rule(data=st.data(), answer=st.sampled_from(["result", "result", "failed", "returned", "missing", "cancelled"]))
    def answer(self, data, answer: str) -> None:
        lease = data.draw(st.sampled_from([lease for lease in self.leases() if lease.inflight]))
        task_id = data.draw(st.sampled_from(sorted(lease.inflight)))
        if answer == "result":
            item = lease.answered(task_id)
            if not item.future.done():
                item.future.set_result(task_id)
        elif answer == "failed":
            item = lease.answered(task_id)
            if not item.future.done():
                item.future.set_exception(RuntimeError("task process died"))
        elif answer == "returned":
            self.do(self.core.returned(lease, task_id))
        elif answer == "missing":
            self.do(self.core.missing(lease, task_id, "numpy", self.now))
        elif lease.inflight[task_id].cancel_asked:
            cancel_running(lease.cancelled(task_id).future)
        else:
            with pytest.raises(ProtocolError):
                lease.cancelled(task_id)
            self.end(lease, "cancelled what nobody asked", ban=True)

    @precondition(lambda self: any(lease.slots > 1 for lease in self.leases()))
    @rule(data=st.data())
    def slot_given_away(self, data) -> None:
        """Fair sharing on the worker gave one or more of a lease's slots to someone else."""
        lease = data.draw(st.sampled_from([lease for lease in self.leases() if lease.slots > 1]))
        self.do(self.core.slots_taken(lease, data.draw(st.integers(1, lease.slots - 1)), self.now))

    @precondition(lambda self: self.core.leases)
    @rule(data=st.data(), reason=st.sampled_from([None, "connection reset"]))
    def lease_ends(self, data, reason: str | None) -> None:
        self.end(data.draw(st.sampled_from(self.core.leases)), reason)

    @precondition(lambda self: len(self.banned_at) < 2)
    @rule(worker=st.sampled_from(WORKERS))
    def ban(self, worker: str) -> None:
        self.core.ban(worker, "broke the protocol")
        self.banned_at.setdefault(worker, self.now)

    @precondition(lambda self: self.items)
    @rule(data=st.data(), how=st.sampled_from(["user", "interrupt"]))
    def cancel(self, data, how: str) -> None:
        item = data.draw(st.sampled_from(self.items))
        if how == "user":
            item.future.cancel()
        elif not item.future.done():
            self.do(self.core.interrupt(item.future))
            assert item.future.cancelled()

    @precondition(lambda self: len(self.items) >= 8 and not self.closed)  # (late: each ends most of the game)
    @rule(which=st.sampled_from(["leaving", "withdraw", "interrupt_all", "close"]))
    def shutdown(self, which: str) -> None:
        if which == "leaving":
            self.core.leaving(self.now)
        elif which == "close":
            self.do(self.core.close(self.now))
            self.closed = True
        else:
            self.do(self.core.withdraw_queued() if which == "withdraw" else self.core.interrupt_all())

    @rule(dt=st.sampled_from([0.25, 3.0, 6.0, 31.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.do(self.core.tick(self.now))

    @invariant()
    def every_task_is_done_or_in_exactly_one_place(self) -> None:
        pending = list(self.core.pending)
        for item in self.items:
            places = pending.count(item) + sum(item.id in lease.inflight for lease in self.core.leases)
            assert places <= 1, f"task {item.id} is in {places} places"
            assert places == 1 or item.future.done(), f"task {item.id} was lost"

    @invariant()
    def no_lease_holds_more_than_it_was_credited(self) -> None:
        for lease in self.core.leases:
            assert lease.credits >= 0 and len(lease.inflight) <= self.sent.get(lease, 0) <= self.granted.get(lease, 0)

    @invariant()
    def leases_stay_within_max_workers(self) -> None:
        assert sum(lease.slots for lease in self.core.leases) <= self.core.options.max_workers

    @invariant()
    def retries_are_bounded(self) -> None:
        for item in self.items:
            assert len(item.losses) <= self.core.options.max_retries + 1
            if len(item.losses) > self.core.options.max_retries:
                assert item.future.done()
                if not item.future.cancelled():
                    assert isinstance(item.future.exception(0), (WorkerLostError, RuntimeError))


ClientMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
test_client_core_state_machine = ClientMachine.TestCase
