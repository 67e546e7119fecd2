"""The worker's cache of big values (:mod:`p2pexec.protocol.values`), holding their bytes where they landed.

A BLOB's message is written, chunk by chunk as each is decrypted, into a
sealed memfd (:func:`.hop.allocate`),
so a cached value is a view of that memory; each task that uses it gets
the memfd and maps it privately (copy on write): it reads the value in
place and may write into its own copy.  The daemon never unpickles a
value: it checks the digest and hands the bytes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..protocol.values import (ARRIVING_SECONDS, DIGEST_BYTES, LeaseValues, ValueCache, check_blob, split_blob,
                               split_task)

VERIFY_IN_THREAD = 4 << 20  # hash values at least this big off the loop (blake3 lets go of the GIL)


@dataclass(frozen=True)
class Blob:
    """A value's payload, and (memfd, offset) when it lies in shared memory."""

    data: memoryview
    shared: tuple[int, int] | None


class Arrivals:
    """Tells the tasks that wait for a value another lease of their member brings when one is stored, or
    turned away by a cache too small for it (then waiting is in vain)."""

    REMEMBER = 64  # values turned away, remembered

    def __init__(self) -> None:
        self._news = trio.Event()
        self.refused: dict[tuple[str, bytes], None] = {}

    def stored(self, member: str, name: bytes, kept: bool) -> None:
        if not kept:
            self.refused[(member, name)] = None
            if len(self.refused) > self.REMEMBER:
                del self.refused[next(iter(self.refused))]
        self._news.set()
        self._news = trio.Event()

    async def news(self) -> None:
        await self._news.wait()


class LeaseBlobs:
    """One lease's side of the cache: values as they arrive (checked), and the values of each task."""

    def __init__(self, cache: ValueCache[Blob], member: str, arrivals: Arrivals) -> None:
        self.values = LeaseValues(cache, member)
        self.arrivals = arrivals

    async def blob(self, task_id: int, data: memoryview, memfd: int | None, offset: int) -> None:
        """A BLOB op's data, found at ``offset`` of its message (in ``memfd`` if it is shared)."""
        name, value = split_blob(data)
        if value.nbytes >= VERIFY_IN_THREAD:
            await trio.to_thread.run_sync(check_blob, name, value)
        else:
            check_blob(name, value)
        shared = (memfd, offset + DIGEST_BYTES) if memfd is not None else None
        kept = self.values.blob(task_id, name, Blob(value, shared), value.nbytes)
        self.arrivals.stored(self.values.member, name, kept)

    def task(self, task_id: int, data: memoryview,
             offset: int) -> tuple[list[Blob], list[bytes], memoryview, int, list[bytes] | None]:
        """A TASK_WITH_VALUES op's data: its values, the digests not held, its payload, where that starts,
        and its digests if one may still be arriving on another lease (then :meth:`awaited`), else None."""
        names, payload, start, arriving = split_task(data)
        found, missing = self.values.task(task_id, names)
        return found, missing, payload, offset + start, names if arriving else None

    async def awaited(self, names: list[bytes], found: list[Blob],
                      missing: list[bytes]) -> tuple[list[Blob], list[bytes]]:
        """A task's values (``names``, of which :meth:`task` found ``found`` and lacked ``missing``) once the
        cache holds the missing ones, one was turned away by it, or ARRIVING_SECONDS passed; and the
        digests still missing then."""
        member, cache = self.values.member, self.values.cache
        with trio.move_on_after(ARRIVING_SECONDS):
            while not all((member, name) in cache for name in missing):
                if any((member, name) in self.arrivals.refused for name in missing):
                    break
                await self.arrivals.news()
        late, still = self.values.cached(missing)
        if still:
            return [], still
        arrived, held = dict(zip(missing, late)), iter(found)
        return [arrived[name] if name in arrived else next(held) for name in names], []
