"""The client's data, without I/O: a task waiting or sent, the client's half of a lease, and the
actions its core (:mod:`.client_core`) asks the adapter (:mod:`.scheduler`) to carry out."""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ProtocolError
from .protocol import messages
from .protocol.frames import MAX_MESSAGE, Buffer, nbytes
from .protocol.resources import ANY, Need
from .task_env import NOTHING, TaskEnv

if TYPE_CHECKING:
    from .hoisting import Value

SKIP_AT_MOST = 64  # tasks a lease passes over (their packages are missing there) before it waits


@dataclass(eq=False)
class WorkItem:
    future: Future[Any]
    payload: list[Buffer]
    id: int
    started: bool = False
    losses: list[str] = field(default_factory=list)
    size: int = 0
    cancel_asked: bool = False  # a WITHDRAW or INTERRUPT went to its worker
    deadline: float = math.inf  # with task_timeout: when it is interrupted, then when its worker must have
                                # answered the interrupt (monotonic)
    ran_on: tuple[str, str, str] | None = None  # (member, peer, machine) of the worker it was last sent to: stats
    need: Need = ANY  # what its slot must have (ex.options / resources=)
    env: TaskEnv = NOTHING  # the installed packages it refers to
    since: float = 0.0  # when it was queued (monotonic; the executor stamps it)
    values: tuple[Value, ...] = ()  # the big values its payload refers to, sent beside it (protocol/values.py)
    sent_with: tuple[bytes, ...] = ()  # the digests of those sent with it last time
    uncached: bool = False  # a worker sent it back for lack of a value: it goes with all its values next

    def __post_init__(self) -> None:
        self.size = sum(nbytes(p) for p in self.payload)


class LeaseState:
    """The client's half of one lease (the worker's is :class:`~.protocol.lease.CreditLedger`): its slots,
    the credits it may still spend, the tasks it holds, and the checks on what its worker answers."""

    def __init__(self, worker: str, peer: str, slots: int, key: bytes = b"", need: Need = ANY,
                 machine: str = "") -> None:
        self.worker = worker  # the member who runs it: bans and membership go by this
        self.peer = peer
        self.machine = machine  # the worker's name for its machine (messages.machine_name)
        self.label = f"{worker}/{machine}" if machine else worker  # what logs and status call it
        self.slots = slots
        self.key = key  # the member key its offer was signed with: still a member's?
        self.need = need  # it runs only tasks of this need
        self.credits = 0
        self.inflight: dict[int, WorkItem] = {}
        self.control: list[bytes] = []  # WITHDRAW, INTERRUPT and PING ops for the feeder to send
        self.open = False  # its channel is up (a lease still dialing serves nobody yet)
        self.path = "dialing"  # direct, relayed, or "upgraded after N s"
        self.stuck = False  # its need has work, none of which its worker has the packages for

    def __repr__(self) -> str:
        return f"<lease {self.label}@{self.peer[-8:]} slots={self.slots}>"

    def answered(self, task_id: int) -> WorkItem:
        """The task ``task_id`` its worker answers, no longer held; a task it does not hold breaks the protocol."""
        item = self.inflight.pop(task_id, None)
        if item is None:
            raise ProtocolError(f"worker {self.label} answered unknown task {task_id}")
        return item

    def cancelled(self, task_id: int) -> WorkItem:
        """Like :meth:`answered`, for a CANCELLED answer, which only a WITHDRAW or INTERRUPT may bring
        (a task wrongly said cancelled stays held: it runs elsewhere once the lease ends)."""
        item = self.inflight.get(task_id)
        if item is not None and not item.cancel_asked:
            raise ProtocolError(f"worker {self.label} cancelled task {task_id}, which nobody asked it to")
        return self.answered(task_id)


@dataclass
class SchedulerOptions:
    max_workers: int
    max_retries: int = 2
    lease_idle: float = 10.0
    warn_after: float = 30.0
    worker_timeout: float | None = None
    shutdown_timeout: float | None = 60.0  # once shutting down, fail the work no worker took for this long
    board_hint: str = ""
    relays: tuple[str, ...] = ()
    allow: frozenset[str] | None = None  # use only workers run by these members
    max_result_size: int = MAX_MESSAGE  # a bigger result (or claim of one) fails its future
    trusted_results: bool = False  # unpickle results without the allow-list (workers may run code here)
    result_types: frozenset[str] = frozenset()  # "module.name" entries added to the allow-list
    task_timeout: float | None = None  # interrupt a task running longer, failing it with TimeoutError
    strict_versions: bool = True  # a worker with another major version of a package a task uses is skipped
    max_tasks_per_child: int | None = None  # a task process runs at most this many tasks, then a fresh one


# -- actions: what the adapter does after a call to the core

@dataclass(frozen=True)
class Post:
    """Sign and post ``mtype`` with ``body`` on the board (a request also says how the network sees us)."""

    mtype: str
    body: dict[str, Any]
    ttl: float


@dataclass(frozen=True)
class SayHello:
    """Post our hello (an observer asked)."""


@dataclass(frozen=True)
class Dial:
    """Start the lease ``lease`` on the worker of ``offer``: dial, accept, feed."""

    lease: LeaseState
    offer: messages.Message


@dataclass(frozen=True)
class Fail:
    """Fail ``item``'s future with ``error`` (unless it is done), and count it."""

    item: WorkItem
    error: BaseException


@dataclass(frozen=True)
class Cancel:
    """Cancel ``item``'s future, running or not: its task runs nowhere."""

    item: WorkItem


@dataclass(frozen=True)
class EndLease:
    """End ``lease`` with ``error``: its worker broke the protocol; the rest of its tasks run elsewhere."""

    lease: LeaseState
    error: ProtocolError


@dataclass(frozen=True)
class Warn:
    """Log ``text`` as a warning."""

    text: str


@dataclass(frozen=True)
class Wake:
    """Wake the lease feeders: there is something to send."""


@dataclass(frozen=True)
class Offered:
    """A usable offer came: whoever waits to count the cluster's slots may look now."""


Action = Post | SayHello | Dial | Fail | Cancel | EndLease | Warn | Wake | Offered
WAKE, OFFERED, SAY_HELLO = Wake(), Offered(), SayHello()


def fail_waiting(item: WorkItem, error: BaseException) -> list[Action]:
    """``item``, just taken off the pending line, fails with ``error``; one cancelled meanwhile only tells its
    waiters that it is (as a pool's queue does)."""
    return [Fail(item, error)] if item.started or item.future.set_running_or_notify_cancel() else []
