"""Which workers can run which tasks, by their installed packages: the client's side.

Each task's :class:`TaskEnv` says which installed distributions its
pickle refers to (:mod:`p2pexec.environment` reads them from the pickle)
and at which versions the client has them.  The client asks workers about
those distributions in its requests; a worker answers with its versions
in its offers.  :class:`Fitting` keeps the answers, and a task goes only
to a worker with no known misfit: a missing distribution, or (strict) a
different major version.  A worker that could not import a module of a
task says so (the task comes back, it is no loss); the task then avoids
that worker.  When every worker online has answered and none fits, the
task fails with :class:`~p2pexec.errors.MissingPackageError`.
Such a mark is not for ever (the friend may install the module): it goes
when the worker's answer about a distribution changes (another version, or
installed now), and else after :data:`LACK_EXPIRES` seconds; at worst a
task then goes there once more and comes back.

Pure, given the clock; the metadata lookups are cached in
:mod:`p2pexec.environment`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import environment
from .environment import MAX_ASKED, Misfit
from .errors import MissingPackageError
from .namespaces import Initialized
from .protocol.frames import Buffer
from .seeding import Seeded
from .task_env import NOTHING, TaskEnv

if TYPE_CHECKING:
    from .hoisting import Value

log = logging.getLogger("p2pexec.client")

REMEMBER_SECONDS = 90.0  # an answer older than this may be out of date (the friend installed something)
LACK_EXPIRES = 600.0  # a module a worker could not import is tried there again after this long


class EnvFinder:
    """A task's :class:`TaskEnv`, cheaply: a function's once, its arguments only when they may name packages."""

    def __init__(self, size: int = 256) -> None:
        self._by_function: OrderedDict[int, tuple[Callable[..., Any], TaskEnv]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()  # submitting threads share it

    def of(self, fn: Callable[..., Any], plain: bool, payload: list[Buffer], values: Sequence[Value] = ()) -> TaskEnv:
        """``plain``: the task's arguments are plain builtin data (:func:`~p2pexec.tasks.is_plain`);
        ``values``: the big values it refers to, whose modules count too (each read once)."""
        if values:
            return self._with_values(self.of(fn, plain, payload), values)
        while isinstance(fn, (Seeded, Initialized)):  # a new wrapper per submit: the function inside counts
            fn = fn.fn
        if plain:
            with self._lock:
                hit = self._by_function.get(id(fn))
                if hit is not None and hit[0] is fn:  # (the function is held, so its id is not reused meanwhile)
                    self._by_function.move_to_end(id(fn))
                    return hit[1]
        main = payload[1] if len(payload) > 1 else payload[0]  # [header, pickle, out-of-band buffers...]
        modules = environment.referenced_modules(main)
        env = TaskEnv(environment.distributions(modules), modules) if modules else NOTHING
        if plain:  # plain arguments name no module: this is the function's own
            with self._lock:
                self._by_function[id(fn)] = (fn, env)
                if len(self._by_function) > self._size:
                    self._by_function.popitem(last=False)
        return env

    @staticmethod
    def _with_values(env: TaskEnv, values: Sequence[Value]) -> TaskEnv:
        modules = set(env.modules)
        for value in values:
            if value.modules is None:
                value.modules = environment.referenced_modules(value.pickle)
            modules |= value.modules
        if len(modules) == len(env.modules):
            return env
        return TaskEnv(environment.distributions(frozenset(modules)), frozenset(modules))


class Fitting:
    """What the client knows of each worker's distributions, by peer id."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.asking: dict[str, str] = {}  # distributions requests ask about -> the client's version
        self._heard: dict[str, tuple[str, dict[str, str | None], float]] = {}  # peer -> member, versions, when
        self._lacks: dict[str, dict[str, float]] = {}  # peer -> modules a task of ours could not import there, when
        self._warned: set[tuple[str, str]] = set()
        self._memo: dict[tuple[str, int], tuple[TaskEnv, Misfit | None]] = {}  # (peer, id(env)): asked per task

    def want(self, env: TaskEnv) -> None:
        """Ask workers about these distributions from now on (at most :data:`MAX_ASKED`)."""
        for dist, version in env.needs.items():
            if dist not in self.asking and len(self.asking) < MAX_ASKED:
                self.asking[dist] = version

    def heard(self, peer: str, member: str, versions: object, now: float) -> None:
        """A worker's answer (from its offer); garbage is ignored."""
        if not isinstance(versions, dict):
            return
        clean = {k: v for k, v in versions.items() if isinstance(k, str) and (v is None or isinstance(v, str))}
        _, known, _ = self._heard.get(peer, (member, {}, now))
        if any(dist in known and known[dist] != version for dist, version in clean.items()):
            self._lacks.pop(peer, None)  # its environment changed: what it lacked may be there now
        self._heard[peer] = (member, {**known, **clean}, now)
        self._memo.clear()

    def lacks(self, peer: str, member: str, module: str, now: float) -> None:
        """A task of ours could not import ``module`` on that worker."""
        self._lacks.setdefault(peer, {})[module] = now
        self._memo.clear()
        if peer not in self._heard:
            self._heard[peer] = (member, {}, now)

    def misfit(self, peer: str, env: TaskEnv) -> Misfit | None:
        """What is known to keep this worker from running a task of ``env`` (unknown is not a misfit)."""
        if env is NOTHING:
            return None
        hit = self._memo.get((peer, id(env)))
        if hit is not None and hit[0] is env:
            return hit[1]
        if len(self._memo) > 4096:
            self._memo.clear()
        found = self._misfit(peer, env)
        self._memo[(peer, id(env))] = (env, found)
        return found

    def _misfit(self, peer: str, env: TaskEnv) -> Misfit | None:
        lacking = self._lacks.get(peer, {}).keys() & env.modules
        if lacking:
            module = min(lacking)
            dists = environment.distributions([module])
            dist = min(dists) if dists else module
            return Misfit("missing", dist, dists.get(dist, "?"), None)
        heard = self._heard.get(peer)
        if heard is None:
            return None
        member, versions, _ = heard
        known = {dist: versions[dist] for dist in env.needs if dist in versions}
        found = environment.misfit({d: env.needs[d] for d in known}, (), known, self.strict)
        if found is not None and found.kind == "skew" and (peer, found.dist) not in self._warned:
            self._warned.add((peer, found.dist))
            log.warning("not sending tasks that use %s to worker %s: %s; results could differ silently "
                        "(pass strict_versions=False to allow it; to match: %s)", found.dist, member,
                        found.describe(), found.fix())
        return found

    def hopeless(self, env: TaskEnv, online: Iterable[str], now: float) -> MissingPackageError | None:
        """The error to fail a task with, once every worker online has answered and none can run it."""
        if env is NOTHING:
            return None
        online = set(online)
        fresh = {peer for peer, (_, _, when) in self._heard.items() if now - when < REMEMBER_SECONDS}
        if not online or not online <= fresh:
            return None
        misfits = {peer: self.misfit(peer, env) for peer in online}
        if any(m is None for m in misfits.values()):
            return None
        first = min((m for m in misfits.values() if m is not None), key=lambda m: (m.kind != "missing", m.dist))
        found = {f"{self._heard[peer][0]}'s worker ...{peer[-6:]}": self._heard[peer][1].get(first.dist)
                 for peer in online}
        return MissingPackageError(first.dist, env.needs.get(first.dist, first.wanted), found)

    def forget(self, now: float) -> None:
        """Drop answers too old to trust (they are asked again) and modules lacked long enough ago."""
        fresh = {p: h for p, h in self._heard.items() if now - h[2] < REMEMBER_SECONDS}
        lacks = {p: kept for p, modules in self._lacks.items()
                 if (kept := {m: when for m, when in modules.items() if now - when < LACK_EXPIRES})}
        if len(fresh) != len(self._heard) or lacks != self._lacks:
            self._heard, self._lacks = fresh, lacks
            self._memo.clear()
