"""Which code is the user's own, and so travels by value: a script, a notebook, a module not installed.

dill pickles a function or class by value when it cannot "locate" it by
its module and name; a task pickler (one with ``sends_own_code``) also
declines to locate the user's own code, which no worker could import.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
from pathlib import Path
from typing import Any

import dill._dill


@functools.lru_cache(maxsize=1024)
def is_local_module(name: str | None) -> bool:
    """True for a module a worker cannot be expected to have: the user's own code.

    Installed code (stdlib, site-packages, p2pexec itself) is pickled by
    reference, as usual; a script's helper module, a test module or a
    notebook's code is pickled by value, like ``__main__``.
    """
    module = sys.modules.get(name or "")
    path = getattr(module, "__file__", None)
    if not path or (name or "").split(".")[0] == "p2pexec":
        return False
    installed = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    installed.update(p for p in sys.path if "site-packages" in p or "dist-packages" in p)
    resolved = Path(path).resolve()
    return not any(resolved.is_relative_to(Path(p).resolve()) for p in installed if p)


_dill_locate = dill._dill._locate_function


def _locate(obj: Any, pickler: Any = None) -> bool:
    # dill pickles a function or class by value when it cannot "locate" it;
    # our task pickler also declines to locate the user's local code.
    if getattr(pickler, "sends_own_code", False) and is_local_module(getattr(obj, "__module__", None)):
        return False
    return _dill_locate(obj, pickler)


dill._dill._locate_function = _locate


def by_reference(obj: Any) -> bool:
    """Does a task pickle ``obj`` (a function or class) by reference, i.e. by its module and name?"""
    try:
        return not is_local_module(getattr(obj, "__module__", None)) and bool(_dill_locate(obj, None))
    except Exception:
        return False
