"""The GPUs this machine has, as NVIDIA's management library reports them (``pip install p2pexec[gpu]``).

Without the library, or without an NVIDIA driver, the answer is no GPUs:
nothing else depends on it.  ``p2pexec-worker --gpus 0,1`` names GPUs
to share without it.
"""

from __future__ import annotations

import logging

from ..protocol.resources import Gpu

log = logging.getLogger("p2pexec.worker")


def detect() -> tuple[Gpu, ...]:
    try:
        import pynvml  # nvidia-ml-py, the optional extra "gpu"
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("no NVIDIA GPU here: %s", exc)
        return ()
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(Gpu(index, name.decode() if isinstance(name, bytes) else str(name),
                             int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return tuple(found)
    except pynvml.NVMLError as exc:
        log.warning("could not list this machine's GPUs: %s", exc)
        return ()
    finally:
        pynvml.nvmlShutdown()
