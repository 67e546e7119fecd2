"""The worker's cache of big values (:mod:`p2pexec.protocol.values`), holding their bytes where they landed.

A BLOB's message is decrypted into a sealed memfd (:func:`.hop.allocate`),
so a cached value is a view of that memory; each task that uses it gets
the memfd and maps it privately (copy on write): it reads the value in
place and may write into its own copy.  The daemon never unpickles a
value: it checks the digest and hands the bytes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..protocol.values import DIGEST_BYTES, LeaseValues, ValueCache, check_blob, split_blob, split_task

VERIFY_IN_THREAD = 4 << 20  # hash values at least this big off the loop (hashlib lets go of the GIL)


@dataclass(frozen=True)
class Blob:
    """A value's payload, and (memfd, offset) when it lies in shared memory."""

    data: memoryview
    shared: tuple[int, int] | None


class LeaseBlobs:
    """One lease's side of the cache: values as they arrive (checked), and the values of each task."""

    def __init__(self, cache: ValueCache[Blob], member: str) -> None:
        self.values = LeaseValues(cache, member)

    async def blob(self, task_id: int, data: memoryview, memfd: int | None, offset: int) -> None:
        """A BLOB op's data, found at ``offset`` of its message (in ``memfd`` if it is shared)."""
        name, value = split_blob(data)
        if value.nbytes >= VERIFY_IN_THREAD:
            await trio.to_thread.run_sync(check_blob, name, value)
        else:
            check_blob(name, value)
        shared = (memfd, offset + DIGEST_BYTES) if memfd is not None else None
        self.values.blob(task_id, name, Blob(value, shared), value.nbytes)

    def task(self, task_id: int, data: memoryview, offset: int) -> tuple[list[Blob], list[bytes], memoryview, int]:
        """A TASK_WITH_VALUES op's data: its values, the digests not held, its payload and where that starts."""
        names, payload, start = split_task(data)
        found, missing = self.values.task(task_id, names)
        return found, missing, payload, offset + start
