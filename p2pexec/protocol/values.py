"""Big values that cross to a worker once: their wire layout and bookkeeping, without I/O.

An argument value of :data:`HOIST_MIN` bytes or more (bytes-like, a NumPy
array, a function with a big closure, any object whose pickle is that
large) is pickled on its own, as a *value*, named by its :func:`digest`
(BLAKE3 of its payload, which both the client naming it and the worker
checking it compute on up to 8 cores).  A task's pickle refers to it by
index; the task carries the digests.  The worker keeps values in a
bounded cache keyed by ``(member, digest)``, so one member can neither
use nor probe another's.

Who sends what, on a lease's encrypted channel::

    client -> worker   BLOB task=T              digest, then the value's payload   (each in a message of its own)
    client -> worker   TASK_WITH_VALUES task=T  count, digests, then the task's payload
    worker -> client   UNCACHED task=T          the digests the worker does not hold: T was not run

A BLOB is sent for task T just before T, for the values the client does
not believe the worker holds (:class:`SentValues`); the worker checks the
digest (a mismatch is a :class:`~p2pexec.errors.ProtocolError`: the
lease ends) and keeps the value for T even if its cache cannot
(:class:`LeaseValues`), so a value bigger than the whole cache still
works.  A task whose value the worker no longer holds (evicted, the
worker restarted) comes back as UNCACHED; the client sends it again with
all its values, so that second sending runs.  A worker that says UNCACHED of a value sent with the task, or
that the task does not use, breaks the protocol: it cannot make a task
loop.  After :data:`MISSES_BEFORE_INLINE` such answers for one value, the
client sends that value with every task to that worker.

A task may go on one lease while its value crosses on another lease to
the same worker (:class:`SentValues`); the client marks it *arriving*
(the top bit of its count), and the worker holds it until the value is
stored, for :data:`ARRIVING_SECONDS` at most, before saying UNCACHED.
"""

from __future__ import annotations

import os
import struct
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Generic, TypeVar

import blake3

from ..errors import ProtocolError
from .frames import OP_HEADER_BYTES, Buffer, nbytes

HOIST_MIN = 1 << 20  # a value this big (bytes, or pickled bytes) crosses once per worker
DIGEST_BYTES = 32  # BLAKE3's
# Where a BLOB's value starts in its message (after the op's header and the digest).  A value is always
# a chunked message, which a worker rebuilds from a page boundary: a client that lays a value out for this
# offset (tasks.dump_payload's ``landing``) has its arrays used in place in the task process.
VALUE_AT = OP_HEADER_BYTES + DIGEST_BYTES
MAX_VALUES = 1024  # values one task may use
MISSES_BEFORE_INLINE = 2  # UNCACHED answers for a value before the client always sends it with its tasks
KEEP_SECONDS = 60.0  # a member's values stay this long after their last lease (the daemon looks every 30 s)
_COUNT = struct.Struct(">H")
_ARRIVING = 0x8000  # in a TASK_WITH_VALUES count: a value may still be arriving on another lease
ARRIVING_SECONDS = 60.0  # how long a worker waits for such a value before answering UNCACHED

T = TypeVar("T")


_THREADS_FROM = 8 << 20  # a smaller value is hashed on one core (starting threads would cost about as much)
_MAX_THREADS = 8


def _cores() -> int:
    """The cores this process may run on (its affinity, where the system says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def digest(parts: Sequence[Buffer]) -> bytes:
    """The name of a value: the BLAKE3 of its payload's parts, in order.

    BLAKE3 rather than SHA-256: 2.5 times as fast on one core even where SHA-256 has its own instructions
    (4-5 times where it has not, as on most Intel CPUs before 2021), and its tree is hashed on up to 8
    cores (the binding lets go of the GIL): a 256 MiB value is named and checked in 35 ms each on two cores, where a
    tree of SHA-256 took 76.  Its threads are the hasher's own (its ``AUTO`` pool, shared by the process,
    does not survive a ``fork``: a forked child of a client that had named a big value hung naming one).
    """
    big = sum(nbytes(part) for part in parts) >= _THREADS_FROM
    hasher = blake3.blake3(max_threads=min(_cores(), _MAX_THREADS) if big else 1)
    for part in parts:
        hasher.update(memoryview(part).cast("B"))
    return hasher.digest()


def task_header(digests: Sequence[bytes], arriving: bool = False) -> bytes:
    """What precedes a task's payload in TASK_WITH_VALUES: the digests of the values it uses, in order, and
    whether one may still be arriving on another lease (:meth:`SentValues.arriving`)."""
    if not 0 < len(digests) <= MAX_VALUES:
        raise ValueError(f"a task uses 1 to {MAX_VALUES} values, not {len(digests)}")
    return _COUNT.pack(len(digests) | (_ARRIVING if arriving else 0)) + b"".join(digests)


def split_task(data: memoryview) -> tuple[list[bytes], memoryview, int, bool]:
    """TASK_WITH_VALUES data: the digests, the task's payload, where the payload starts in ``data``, and
    whether a value may still be arriving on another lease."""
    if data.nbytes < _COUNT.size:
        raise ProtocolError("task with values too short")
    (word,) = _COUNT.unpack_from(data)
    count, arriving = word & ~_ARRIVING, bool(word & _ARRIVING)
    end = _COUNT.size + count * DIGEST_BYTES
    if not 0 < count <= MAX_VALUES or data.nbytes < end:
        raise ProtocolError(f"task with a malformed list of {count} values")
    digests = [bytes(data[i : i + DIGEST_BYTES]) for i in range(_COUNT.size, end, DIGEST_BYTES)]
    return digests, data[end:], end, arriving


def split_digests(data: memoryview) -> list[bytes]:
    """UNCACHED data: the digests a worker lacks."""
    if data.nbytes == 0 or data.nbytes % DIGEST_BYTES or data.nbytes > MAX_VALUES * DIGEST_BYTES:
        raise ProtocolError(f"malformed list of digests ({data.nbytes} bytes)")
    return [bytes(data[i : i + DIGEST_BYTES]) for i in range(0, data.nbytes, DIGEST_BYTES)]


def split_blob(data: memoryview) -> tuple[bytes, memoryview]:
    """BLOB data: the digest it claims and the value's payload (not checked yet: :func:`check_blob`)."""
    if data.nbytes <= DIGEST_BYTES:
        raise ProtocolError("value too short")
    return bytes(data[:DIGEST_BYTES]), data[DIGEST_BYTES:]


def check_blob(claimed: bytes, value: Buffer) -> None:
    """A value must be what its digest says, or the lease ends: nothing else could ever find it."""
    if digest([value]) != claimed:
        raise ProtocolError("a value does not match its digest")


class ValueCache(Generic[T]):
    """A worker's values, by ``(member, digest)``: at most ``capacity`` bytes, least recently used out first.

    A member's values go once they have had no live lease for
    :data:`KEEP_SECONDS` (:meth:`expire`), or at once when they are removed
    from the cluster (:meth:`drop`).  ``T`` is whatever holds a value's
    bytes; the cache only counts them.
    """

    def __init__(self, capacity: int, keep: float = KEEP_SECONDS) -> None:
        if capacity < 0:
            raise ValueError("a cache size is 0 or more bytes")
        self.capacity = capacity
        self.keep = keep
        self.size = 0
        self._entries: OrderedDict[tuple[str, bytes], tuple[T, int]] = OrderedDict()
        self._leases: Counter[str] = Counter()  # live leases per member
        self._idle_since: dict[str, float] = {}  # members with values and no live lease

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, bytes]) -> bool:
        return key in self._entries

    def get(self, member: str, name: bytes) -> T | None:
        entry = self._entries.get((member, name))
        if entry is None:
            return None
        self._entries.move_to_end((member, name))
        return entry[0]

    def put(self, member: str, name: bytes, item: T, size: int) -> bool:
        """Keep a value, evicting the least recently used; False if it is bigger than the whole cache."""
        key = (member, name)
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old[1]
        if size > self.capacity:
            return False
        while self.size + size > self.capacity:
            _, (_, freed) = self._entries.popitem(last=False)
            self.size -= freed
        self._entries[key] = (item, size)
        self.size += size
        return True

    def drop(self, member: str) -> int:
        """Forget every value of ``member``; how many there were."""
        keys = [key for key in self._entries if key[0] == member]
        for key in keys:
            self.size -= self._entries.pop(key)[1]
        self._idle_since.pop(member, None)
        return len(keys)

    def lease_started(self, member: str) -> None:
        self._leases[member] += 1
        self._idle_since.pop(member, None)

    def lease_ended(self, member: str, now: float) -> None:
        self._leases[member] -= 1
        if self._leases[member] <= 0:
            del self._leases[member]
            self._idle_since[member] = now

    def expire(self, now: float) -> list[str]:
        """Drop the values of members without a live lease for ``keep`` seconds; which members."""
        gone = [member for member, since in self._idle_since.items() if now - since >= self.keep]
        for member in gone:
            self.drop(member)
        return gone


class LeaseValues(Generic[T]):
    """The values of one lease's tasks, on the worker: those that just arrived, else the cache's.

    A BLOB belongs to the task that follows it; it is kept for that task
    whether or not the cache can keep it, so every task the client sent
    its values with runs.
    """

    def __init__(self, cache: ValueCache[T], member: str) -> None:
        self.cache = cache
        self.member = member
        self.for_task: int | None = None  # the task the values in ``arrived`` came for
        self.arrived: dict[bytes, T] = {}
        self.received = 0  # BLOBs, for the log

    def blob(self, task_id: int, name: bytes, item: T, size: int) -> bool:
        """A checked value that came for task ``task_id``; whether the cache could keep it (for other tasks)."""
        if self.for_task not in (None, task_id):
            raise ProtocolError(f"the client sent values for task {task_id} before task {self.for_task}")
        self.for_task = task_id
        self.arrived[name] = item
        self.received += 1
        return self.cache.put(self.member, name, item, size)

    def cached(self, names: Iterable[bytes], arrived: Mapping[bytes, T] | None = None) -> tuple[list[T], list[bytes]]:
        """``names``' values in order, each from ``arrived`` (what came with the task) else the cache, and the
        digests not held (a task that waited for them, :data:`ARRIVING_SECONDS`, has only the cache)."""
        found: list[T] = []
        missing: list[bytes] = []
        for name in names:
            item = arrived.get(name) if arrived else None
            if item is None:
                item = self.cache.get(self.member, name)
            if item is None:
                if name not in missing:
                    missing.append(name)
            else:
                found.append(item)
        return found, missing

    def task(self, task_id: int, names: Iterable[bytes]) -> tuple[list[T], list[bytes]]:
        """Task ``task_id``'s values in order, and the digests not held (then the task cannot run here)."""
        if self.for_task not in (None, task_id):
            raise ProtocolError(f"the client sent values for task {self.for_task}, then task {task_id}")
        found_missing = self.cached(names, self.arrived)
        self.for_task, self.arrived = None, {}
        return found_missing


class SentValues:
    """Which values one worker should hold, as the client knows it; the client's half of the protocol.

    Kept per worker peer for the executor's life, so a new lease with the
    same worker does not send them again (the worker keeps a member's
    values a while after a lease ends; if it lost them, it says so).

    Several leases may run on one worker (one per slot, say).  A value
    crosses on one of them: a task of another lease that uses it waits
    until that lease has sent it (:meth:`sending_elsewhere`), then goes
    marked :meth:`arriving`, until a task using the value was answered.
    The worker then waits for the value to be stored (it may still be
    checking it, or reading it from another connection) before saying
    UNCACHED; before this, two slots of one worker each received a big
    value about one time in two.
    """

    REMEMBER = 4096  # digests remembered per worker; older ones are sent again if needed

    def __init__(self) -> None:
        # digest -> the lease (any key) that sent it, until a task using it is answered: then _ANSWERED
        self._held: OrderedDict[bytes, object] = OrderedDict()
        self._sending: set[bytes] = set()  # being written by that lease now
        self._misses: Counter[bytes] = Counter()

    def sending_elsewhere(self, names: Iterable[bytes], by: object) -> bool:
        """Whether a lease other than ``by`` is still writing one of ``names``: wait for it, do not send it twice."""
        return any(name in self._sending and self._held.get(name) is not by for name in names)

    def to_send(self, names: Iterable[bytes], by: object = None, every: bool = False) -> list[bytes]:
        """The values lease ``by`` sends before a task that uses ``names``; the worker is taken to hold them
        from now on (:meth:`sent` says whether they left).

        ``every``: all of them, for a task the worker sent back as UNCACHED
        (a value sent with it before may not have stayed either), so that
        its second sending runs.
        """
        out: list[bytes] = []
        for name in names:
            if name in out:
                continue
            if not every and name in self._held and self._misses[name] < MISSES_BEFORE_INLINE:
                self._held.move_to_end(name)
                continue
            out.append(name)
            self._held[name] = by
            self._held.move_to_end(name)
            self._sending.add(name)
            if len(self._held) > self.REMEMBER:
                self._sending.discard(self._held.popitem(last=False)[0])
        return out

    def sent(self, names: Iterable[bytes], by: object, ok: bool) -> None:
        """Lease ``by`` wrote ``names`` (``ok``), or ended before it had: then another lease sends them."""
        for name in names:
            self._sending.discard(name)
            if not ok and name in self._held and self._held[name] is by:
                del self._held[name]

    def arriving(self, names: Iterable[bytes], by: object) -> bool:
        """Whether a task of lease ``by`` that uses ``names`` relies on a value another lease sent, which no
        answer has shown the worker to hold yet."""
        return any((owner := self._held.get(name, _ANSWERED)) is not _ANSWERED and owner is not by for name in names)

    def answered(self, names: Iterable[bytes]) -> None:
        """A task that used ``names`` was answered: the worker held them."""
        for name in names:
            if name in self._held:
                self._held[name] = _ANSWERED

    def uncached(self, said: Iterable[bytes], used: Iterable[bytes], sent_with: Iterable[bytes]) -> None:
        """The worker did not hold ``said`` for a task that uses ``used`` and was sent with ``sent_with``."""
        used, sent_with = set(used), set(sent_with)
        for name in said:
            if name not in used:
                raise ProtocolError("the worker lacks a value the task does not use")
            if name in sent_with:
                raise ProtocolError("the worker lacks a value that was sent with the task")
            if name not in self._sending:  # (one being written now is on its way)
                self._held.pop(name, None)
            self._misses[name] += 1


_ANSWERED = object()  # in SentValues._held: a task that used the value was answered
