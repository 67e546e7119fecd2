import threading

from tests.localpkg import consts

_lock = threading.Lock()  # a module-level lock: a worker gets one of its own, as importing this would make


def scaled(x: int) -> int:
    return x * consts.FACTOR


def locked_double(x: int) -> int:
    with _lock:
        return 2 * x
