"""``current_worker()``: inside a task, who runs it and with what.

The worker daemon gives each task process a description of itself in an
environment variable when it starts the process; a task reads it back.
It is the worker's word, as advertised on the board.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .protocol.resources import Gpu, Resources

WORKER_ENV = "P2PEXEC_WORKER_INFO"


@dataclass(frozen=True)
class WorkerInfo:
    member: str  # the member who runs the worker
    worker: str  # its libp2p peer id
    slot: int
    resources: Resources  # what the worker lends, as it advertises it
    gpus: tuple[Gpu, ...]  # the GPUs this slot's task process sees (CUDA_VISIBLE_DEVICES)


def describe(member: str, worker: str, slot: int, resources: Resources) -> str:
    """The variable's value for one slot's task process (the daemon's side)."""
    return json.dumps({"member": member, "worker": worker, "slot": slot, "resources": resources.to_json()})


def current_worker() -> WorkerInfo | None:
    """Who runs this task: member, worker id, slot and resources; None outside a p2pexec task."""
    text = os.environ.get(WORKER_ENV)
    if not text:
        return None
    fields = json.loads(text)
    resources = Resources.from_json(fields["resources"])
    return WorkerInfo(fields["member"], fields["worker"], int(fields["slot"]), resources,
                      resources.gpus_of(int(fields["slot"])))
