"""What a task asks for and what a worker has: pure rules shared by both sides.

A client's tasks carry a :class:`Need` (memory, cores, GPUs, tags).  A
worker advertises its :class:`Resources` in its hellos and offers, and
keeps a :class:`Reservations` ledger: a lease takes its slots and, for
each slot, the memory, cores and GPUs its need asks for, so the worker
never promises more than it has.  Tasks of different needs never share
a lease: each need is requested, offered and leased on its own.

Memory is address space (``RLIMIT_AS``), the limit a task process can be
held to on every Unix; cores are a reservation (no task is pinned); GPUs
are split between the slots when the worker starts, and a slot's task
process sees only its own (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
TAG = re.compile(r"[A-Za-z0-9_.+-]{1,32}")
MAX_TAGS = 16
MAX_GPUS = 16  # GPUs described one by one in a message (a bigger machine still counts them all)
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"2G"``, ``1048576``: bytes (binary units, as memory is sold)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size like '8GiB' or 512 * 2**20")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size like '8GiB' or '512MiB'")
    size = int(float(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def format_size(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def check_tags(tags: Iterable[str]) -> frozenset[str]:
    tags = frozenset(tags)
    bad = sorted(t for t in tags if not isinstance(t, str) or not TAG.fullmatch(t))
    if bad:
        raise ValueError(f"tags must be 1-32 letters, digits or _.+- each, not {bad[0]!r}")
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    return tags


@dataclass(frozen=True)
class Need:
    """What each task asks of the slot that runs it; the empty need is any slot's share."""

    memory: int | None = None  # bytes of address space
    cores: int | None = None
    gpus: int = 0
    tags: frozenset[str] = frozenset()
    requires: tuple[str, ...] = ()  # PEP 508 requirements on the worker's distributions ("numpy>=2")

    @classmethod
    def of(cls, memory: str | int | None = None, cores: int | None = None, gpus: int = 0,
           tags: Iterable[str] = (), requires: Iterable[str] = ()) -> Need:
        """A need from a user's arguments; a ValueError says which one is wrong."""
        if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
            raise ValueError(f"cores must be a whole number of at least 1, not {cores!r}")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ValueError(f"gpus must be a whole number of 0 or more, not {gpus!r}")
        if isinstance(tags, str):
            raise TypeError("tags= takes a set of names, e.g. tags={'big'}")
        if isinstance(requires, str):
            requires = [requires]
        if requires:
            from ..environment import parse_requires  # (packaging: kept out of task processes' start)

            requires = sorted({str(req) for req in parse_requires(requires)})
        if len(tuple(requires)) > 16:
            raise ValueError("at most 16 requirements")
        return cls(None if memory is None else parse_size(memory), cores, gpus, check_tags(tags), tuple(requires))

    def updated(self, **changes: Any) -> Need:
        """This need with the given requests replaced (``ex.options`` on top of ``resources=``)."""
        mine: dict[str, Any] = {"memory": self.memory, "cores": self.cores, "gpus": self.gpus, "tags": self.tags,
                                "requires": self.requires}
        mine.update(changes)
        return Need.of(**mine)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.cores is not None:
            out["cores"] = self.cores
        if self.gpus:
            out["gpus"] = self.gpus
        if self.tags:
            out["tags"] = sorted(self.tags)
        if self.requires:
            out["requires"] = list(self.requires)
        return out

    @classmethod
    def from_json(cls, data: object) -> Need:
        """A need from a message; ValueError (or TypeError) if it is not one."""
        if not isinstance(data, Mapping) or set(data) - {"memory", "cores", "gpus", "tags", "requires"}:
            raise ValueError("not a resource need")
        tags, requires = data.get("tags", []), data.get("requires", [])
        if not isinstance(tags, list) or not isinstance(requires, list) or len(requires) > 16:
            raise ValueError("tags and requires must be lists")
        return cls.of(data.get("memory"), data.get("cores"), data.get("gpus", 0), tags, requires)

    def __str__(self) -> str:
        parts = [f"memory={format_size(self.memory)}" if self.memory else "",
                 f"cores={self.cores}" if self.cores else "", f"gpus={self.gpus}" if self.gpus else "",
                 f"tags={{{', '.join(sorted(self.tags))}}}" if self.tags else "",
                 f"requires={list(self.requires)}" if self.requires else ""]
        return ", ".join(p for p in parts if p) or "no resources"


_fields_equal = Need.__eq__


def _same_need(self: Need, other: object) -> bool:
    return self is other or _fields_equal(self, other)


Need.__eq__ = _same_need  # type: ignore[method-assign,assignment]  # (a lease's need is the task's, mostly: per task)
ANY = Need()


@dataclass(frozen=True)
class Gpu:
    index: int
    model: str = "?"
    memory: int = 0  # bytes, 0 where unknown

    def __str__(self) -> str:
        return f"{self.model}{f' {format_size(self.memory)}' if self.memory else ''}"


@dataclass(frozen=True)
class Resources:
    """What a worker lends: advertised in its hellos and offers, shown by ``p2pexec status``."""

    slots: int
    cores: int
    memory: int  # bytes its tasks may use in all (--memory, else the machine's)
    gpus: tuple[Gpu, ...] = ()  # those it shares (--gpus)
    tags: frozenset[str] = frozenset()
    os: str = ""
    arch: str = ""
    python: str = ""
    memory_capped: bool = False  # --memory given: a task that asks for nothing gets a slot's share at most

    @property
    def share(self) -> int:
        """One slot's share of the memory: what a task that asked for nothing is counted (and, capped, held) to."""
        return self.memory // max(1, self.slots)

    def gpus_of(self, slot: int) -> tuple[Gpu, ...]:
        """The GPUs slot ``slot`` sees: the shared ones dealt round-robin, so none is seen by two slots."""
        return tuple(gpu for i, gpu in enumerate(self.gpus) if i % max(1, self.slots) == slot)

    def to_json(self) -> dict[str, Any]:
        return {"slots": self.slots, "cores": self.cores, "memory": self.memory, "capped": self.memory_capped,
                "gpus": [[g.index, g.model[:64], g.memory] for g in self.gpus[:MAX_GPUS]],
                "tags": sorted(self.tags), "os": self.os[:32], "arch": self.arch[:32], "python": self.python[:32]}

    @classmethod
    def from_json(cls, data: object) -> Resources:
        """Resources from a message; ValueError (or TypeError) if they are not."""
        if not isinstance(data, Mapping):
            raise ValueError("not a resource description")
        numbers = [data.get(k) for k in ("slots", "cores", "memory")]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in numbers):
            raise ValueError("slots, cores and memory must be whole numbers")
        gpus = data.get("gpus", [])
        if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
            raise ValueError("bad gpus")
        parsed = []
        for gpu in gpus:
            if not (isinstance(gpu, list) and len(gpu) == 3 and isinstance(gpu[0], int) and isinstance(gpu[1], str)
                    and isinstance(gpu[2], int)):
                raise ValueError("bad gpu")
            parsed.append(Gpu(gpu[0], gpu[1][:64], gpu[2]))
        tags = data.get("tags", [])
        texts = [data.get(k, "") for k in ("os", "arch", "python")]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("bad tags or platform")
        return cls(numbers[0], numbers[1], numbers[2], tuple(parsed), check_tags(tags),  # type: ignore[arg-type]
                   texts[0][:32], texts[1][:32], texts[2][:32], data.get("capped") is True)

    def describe(self) -> str:
        """One line for people: what this worker lends."""
        gpus = f", {len(self.gpus)} GPU(s) ({', '.join(str(g) for g in self.gpus[:4])})" if self.gpus else ""
        tags = f", tags {{{', '.join(sorted(self.tags))}}}" if self.tags else ""
        return (f"{self.slots} slot(s), {self.cores} core(s), {format_size(self.memory)} memory{gpus}{tags}, "
                f"{self.os}/{self.arch}, Python {self.python}")


def unmet(need: Need, resources: Resources) -> str | None:
    """Why no slot of this worker could ever run a task of ``need`` (None: some slot can)."""
    if need.memory is not None and need.memory > resources.memory:
        return (f"memory={format_size(need.memory)}: it lends {format_size(resources.memory)} in all "
                f"(p2pexec-worker --memory)")
    if need.cores is not None and need.cores > max(resources.cores, 1):
        return f"cores={need.cores}: it has {resources.cores}"
    most = max((len(resources.gpus_of(s)) for s in range(resources.slots)), default=0)
    if need.gpus > most:
        return (f"gpus={need.gpus}: its slots see at most {most} of its {len(resources.gpus)} shared GPU(s) "
                f"(p2pexec-worker --gpus, --slots)")
    missing = need.tags - resources.tags
    if missing:
        return f"tags {{{', '.join(sorted(missing))}}}: it has {{{', '.join(sorted(resources.tags))}}}"
    return None


@dataclass
class _Held:
    slots: tuple[int, ...]
    memory: int
    cores: int


@dataclass
class Reservations:
    """The worker's ledger of what its leases hold: slots, memory and cores (pure; the daemon asks it)."""

    resources: Resources
    _held: dict[str, _Held] = field(default_factory=dict)  # lease id -> what it holds

    def memory_of(self, need: Need) -> int:
        """Memory a task of ``need`` is counted for (and held to, see :meth:`limit_of`)."""
        return need.memory if need.memory is not None else self.resources.share

    def limit_of(self, need: Need) -> int | None:
        """The address-space limit its task process runs under: its request, else a capped slot's share."""
        if need.memory is not None:
            return need.memory
        return self.resources.share if self.resources.memory_capped else None

    @property
    def busy(self) -> frozenset[int]:
        return frozenset(s for held in self._held.values() for s in held.slots)

    def _left(self) -> tuple[int, int]:
        memory = self.resources.memory - sum(h.memory for h in self._held.values())
        cores = max(self.resources.cores, self.resources.slots) - sum(h.cores for h in self._held.values())
        return memory, cores

    def _fitting(self, need: Need) -> list[int]:
        """Free slots that see enough GPUs, those with the fewest first (a CPU task leaves GPU slots free)."""
        busy = self.busy
        free = [s for s in range(self.resources.slots)
                if s not in busy and len(self.resources.gpus_of(s)) >= need.gpus]
        return sorted(free, key=lambda s: (len(self.resources.gpus_of(s)), s))

    def available(self, need: Need) -> int:
        """Slots a lease of ``need`` could have now."""
        if unmet(need, self.resources) is not None:
            return 0
        memory, cores = self._left()
        per_memory = self.memory_of(need)
        slots = len(self._fitting(need))
        if per_memory > 0:
            slots = min(slots, memory // per_memory)
        return max(0, min(slots, cores // max(1, need.cores or 1)))

    def reserve(self, lease: str, need: Need, slots: int) -> tuple[int, ...] | None:
        """Hold ``slots`` slots for lease ``lease``; their indices, or None if they are not all available."""
        if lease in self._held or slots < 1 or self.available(need) < slots:
            return None
        chosen = tuple(self._fitting(need)[:slots])
        self._held[lease] = _Held(chosen, slots * self.memory_of(need), slots * (need.cores or 1))
        return chosen

    def release(self, lease: str) -> None:
        self._held.pop(lease, None)

    def release_slot(self, lease: str, slot: int) -> None:
        """Lease ``lease`` gives back one of its slots, with that slot's share of memory and cores."""
        held = self._held[lease]
        if slot not in held.slots:
            raise ValueError(f"lease {lease} does not hold slot {slot}")
        count = len(held.slots)
        rest = tuple(s for s in held.slots if s != slot)
        if not rest:
            del self._held[lease]
            return
        self._held[lease] = _Held(rest, held.memory - held.memory // count, held.cores - held.cores // count)


def gpu_list(text: str, detected: Sequence[Gpu]) -> tuple[Gpu, ...]:
    """``--gpus``: ``all`` (those detected), ``none``, or indices like ``0,1`` (described where detected)."""
    text = text.strip().lower()
    if text == "all":
        return tuple(detected)
    if text in ("none", ""):
        return ()
    known = {gpu.index: gpu for gpu in detected}
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--gpus takes 'all', 'none' or indices like 0,1; not {text!r}") from None
    if len(set(indices)) != len(indices) or any(i < 0 for i in indices):
        raise ValueError(f"--gpus {text}: each index once, none negative")
    return tuple(known.get(i, Gpu(i)) for i in indices)


def lent_twice(mine: Resources, others: Mapping[str, Resources], machine_memory: int) -> list[str]:
    """What this worker lends that other workers on the same machine (``label`` -> what each lends) lend too:
    tasks of both may then use it at once.  One sentence each, saying how to split it."""
    said = []
    for label, theirs in others.items():
        both = sorted({g.index for g in mine.gpus} & {g.index for g in theirs.gpus})
        if both:
            said.append(f"GPU {', '.join(map(str, both))} {'is' if len(both) == 1 else 'are'} lent by {label} too: "
                        f"restart one of them with --gpus so that each lends its own (a worker started before the "
                        f"other is not told)")
    total = mine.memory + sum(theirs.memory for theirs in others.values())
    if others and machine_memory and total > machine_memory:
        each = ", ".join(f"{label} {format_size(theirs.memory)}" for label, theirs in others.items())
        said.append(f"this machine has {format_size(machine_memory)} of memory and its workers lend "
                    f"{format_size(total)} in all (this one {format_size(mine.memory)}, {each}): restart one of "
                    f"them with --memory so that they lend at most that")
    return said
