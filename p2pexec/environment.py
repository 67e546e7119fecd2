"""Which installed packages a task needs, and whether a worker has them.

A task's pickle names every module it needs: its function's module and the
classes of its arguments are global references (``GLOBAL``/``STACK_GLOBAL``
opcodes), and dill pickles a module object as a call of
``dill._dill._import_module`` with the module's name.  So the client reads
those names from the pickle itself, without unpickling it (nothing runs) and
without guessing from ``sys.modules``; maps them to installed distributions
and versions; and compares them with what a worker reports.  A task whose
pickle names a module no distribution provides (the user's own code) needs
nothing: that code travels by value.

Pure apart from reading the installed distributions' metadata, which is
cached (:func:`refresh` forgets it).
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib.metadata
import itertools
import logging
import pickletools
import re
import shlex
import struct
import sys
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

log = logging.getLogger(__name__)

#: Top-level modules every worker has: Python's own (also by the Python 2 names that protocols 0 to 2
#: write), and what p2pexec itself runs on.
ALWAYS_THERE = (frozenset(sys.stdlib_module_names) | {m.partition(".")[0] for m in _compat_pickle.IMPORT_MAPPING}
                | {"builtins", "__main__", "p2pexec", "dill"})

#: What :func:`answer` reads of a client's question; the rest is ignored.
MAX_ASKED = 32
MAX_NAME = 100

_MAX_NESTING = 3  # a map's function is a pickle inside the task's pickle; deeper than this is garbage
_MAX_STRING = 256  # longer strings are never module names: not decoded
_MAX_LINE = 1 << 16  # protocol 0's text arguments; a longer one ends the scan

# The scanner's table, one entry per opcode byte: how its argument is laid out, and what it does
# to the little of the stack and memo the scanner models (the strings that name modules).
_NONE, _FIXED, _LINE, _LINES2, _SIZED = range(5)  # argument layouts
(_PUSH, _QUIET, _STOP, _UTF8, _LATIN1, _TEXT, _MEMOIZE, _PUT, _GET, _DUP,
 _GLOBAL, _STACK_GLOBAL, _BYTES) = range(13)  # effects; _PUSH: some value that names nothing
_SIZE = {
    pickletools.TAKEN_FROM_ARGUMENT1: struct.Struct("<B"),
    pickletools.TAKEN_FROM_ARGUMENT4: struct.Struct("<i"),
    pickletools.TAKEN_FROM_ARGUMENT4U: struct.Struct("<I"),
    pickletools.TAKEN_FROM_ARGUMENT8U: struct.Struct("<Q"),
}
_EFFECTS = {
    "FRAME": _QUIET, "PROTO": _QUIET, "MARK": _QUIET, "STOP": _STOP,
    "SHORT_BINUNICODE": _UTF8, "BINUNICODE": _UTF8, "BINUNICODE8": _UTF8,
    "SHORT_BINSTRING": _LATIN1, "BINSTRING": _LATIN1, "UNICODE": _TEXT, "STRING": _TEXT,
    "MEMOIZE": _MEMOIZE, "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT,
    "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET, "DUP": _DUP,
    "GLOBAL": _GLOBAL, "INST": _GLOBAL, "STACK_GLOBAL": _STACK_GLOBAL,
    "SHORT_BINBYTES": _BYTES, "BINBYTES": _BYTES, "BINBYTES8": _BYTES, "BYTEARRAY8": _BYTES,
}
_NO_PREFIX = struct.Struct("")
_Entry = tuple[int, int, struct.Struct, int]


def _table() -> list[_Entry | None]:
    table: list[_Entry | None] = [None] * 256
    for op in pickletools.opcodes:
        arg, effect = op.arg, _EFFECTS.get(op.name, _PUSH)
        if arg is None:
            table[ord(op.code)] = (_NONE, 0, _NO_PREFIX, effect)
        elif arg.n >= 0:
            table[ord(op.code)] = (_FIXED, arg.n, _NO_PREFIX, effect)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            table[ord(op.code)] = (_LINES2 if arg.name == "stringnl_noescape_pair" else _LINE, 0, _NO_PREFIX, effect)
        else:
            table[ord(op.code)] = (_SIZED, 0, _SIZE[arg.n], effect)
    return table


_OPCODES = _table()
# The two callables whose argument names more: dill's _import_module (a module's name) and
# p2pexec's _load_function (a map's function, pickled on its own and carried as bytes).
_IMPORTER, _LOADER = object(), object()
_CALLABLES = {("dill._dill", "_import_module"): _IMPORTER, ("p2pexec.tasks", "_load_function"): _LOADER}


def referenced_modules(pickle: bytes | bytearray | memoryview) -> frozenset[str]:
    """The top-level modules ``pickle`` refers to, other than those every worker has.

    Reads opcodes only: big binary arguments (arrays, bytes) are skipped,
    not copied, so the cost grows with the number of opcodes, not bytes.
    Never raises: a malformed or truncated pickle yields what was found
    before the damage.  For a task payload from :func:`p2pexec.tasks.dump_task`,
    pass its pickle (the second part; the rest are out-of-band buffers).
    """
    found: set[str] = set()
    try:
        _scan(memoryview(pickle).cast("B"), found, 0)
    except Exception:  # noqa: BLE001 - a scanner of untrusted bytes: keep what was found
        log.debug("stopped scanning a malformed pickle", exc_info=True)
    return frozenset(name for name in found if name not in ALWAYS_THERE)


def _scan(data: memoryview, found: set[str], depth: int) -> None:
    """Walk the opcodes, modelling just enough of the stack and memo to name modules."""
    memo: dict[int, object] = {}
    below: object = None  # the two topmost stack values, as far as they name modules
    top: object = None
    pos, end = 0, len(data)
    while pos < end:
        entry = _OPCODES[data[pos]]
        if entry is None:
            return  # not an opcode: garbage
        layout, size, prefix, effect = entry
        pos += 1
        start = pos
        if layout == _FIXED:
            pos += size
        elif layout == _SIZED:
            (length,) = prefix.unpack_from(data, pos)
            if length < 0:
                return
            start = pos + prefix.size
            pos = start + length
        elif layout != _NONE:
            for _ in range(2 if layout == _LINES2 else 1):
                pos += bytes(data[pos:pos + _MAX_LINE]).index(b"\n") + 1  # ValueError: no line, stop
        if pos > end:
            return  # truncated
        if effect == _PUSH:
            value: object = None
        elif effect == _QUIET:
            continue
        elif effect == _STOP:
            return
        elif effect == _MEMOIZE:
            memo[len(memo)] = top
            continue
        elif effect == _PUT:
            memo[_index(data[start:pos], layout)] = top
            continue
        elif effect == _GET:
            value = memo.get(_index(data[start:pos], layout))
        elif effect == _DUP:
            value = top
        elif effect in (_UTF8, _LATIN1):
            value = None
            if pos - start <= _MAX_STRING:
                value = bytes(data[start:pos]).decode("utf-8" if effect == _UTF8 else "latin-1", "replace")
        elif effect == _TEXT:
            value = bytes(data[start:pos]).decode("latin-1").rstrip("\n").strip("'\"")
        elif effect == _GLOBAL:
            module, _, attr = bytes(data[start:pos]).decode("utf-8", "replace").rstrip("\n").partition("\n")
            value = _global(module, attr, found)
        elif effect == _STACK_GLOBAL:
            value = _global(below, top, found) if isinstance(below, str) and isinstance(top, str) else None
        else:  # _BYTES
            value = None
            if top is _LOADER and depth < _MAX_NESTING:
                _scan(data[start:pos], found, depth + 1)
        if top is _IMPORTER and isinstance(value, str):
            _add(value, found)
        below, top = top, value


def _index(arg: memoryview, layout: int) -> int:
    """A memo index: protocol 0's decimal line, or one or four little-endian bytes."""
    return int(bytes(arg)) if layout == _LINE else int.from_bytes(arg, "little")


def _global(module: str, attr: str, found: set[str]) -> object:
    _add(module, found)
    return _CALLABLES.get((module, attr))


def _add(module: str, found: set[str]) -> None:
    top = module.partition(".")[0]
    if top.isidentifier():
        found.add(top)


# --- what is installed -------------------------------------------------------


@functools.cache
def _module_distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def installed() -> dict[str, str]:
    """Every distribution installed here: canonical name -> version (the first on ``sys.path`` wins, as imports do)."""
    return dict(_installed())


@functools.cache
def _installed() -> Mapping[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def refresh() -> None:
    """Forget the cached metadata, after distributions were installed or ``sys.path`` changed."""
    importlib.invalidate_caches()
    _module_distributions.cache_clear()
    _installed.cache_clear()
    _providers.cache_clear()
    _version.cache_clear()


def distributions(modules: Iterable[str]) -> dict[str, str]:
    """The installed distributions that provide ``modules``: canonical name -> version here.

    A module of no distribution (a local file) is left out; one that several
    distributions provide (a namespace package) brings each of them.
    """
    out: dict[str, str] = {}
    for module in modules:
        out.update(_providers(module))
    return out


@functools.cache
def _providers(module: str) -> Mapping[str, str]:
    """The distributions of one top-level module, the quick way where it is named after them.

    Reading every installed distribution's metadata takes half a second on a
    data scientist's machine: a client's first task must not wait for that
    when ``numpy`` comes from ``numpy``.  A namespace package (no
    ``__file__``: several distributions may share it) and any module whose
    distribution has another name (``sklearn``) take the full index.
    """
    loaded = sys.modules.get(module)
    where = getattr(loaded, "__file__", None)
    if where:
        try:
            dists = [importlib.metadata.distribution(module)]
        except (importlib.metadata.PackageNotFoundError, ValueError):
            dists = []
        path = Path(where)
        site = path.parent.parent if path.stem == "__init__" else path.parent
        for dist in itertools.chain(dists, (importlib.metadata.Distribution.at(p) for p in site.glob("*.dist-info"))):
            if dist.metadata["Name"] and module in _top_level(dist):
                return {canonicalize_name(dist.metadata["Name"]): dist.version}
    have = _installed()
    names = (canonicalize_name(d) for d in _module_distributions().get(module, ()))
    return {name: have[name] for name in names if name in have}


def _top_level(dist: importlib.metadata.Distribution) -> set[str]:
    """The top-level modules a distribution installs, from top_level.txt, else from its RECORD."""
    text = dist.read_text("top_level.txt")
    if text is not None:
        return set(text.split())
    tops = set()
    for line in (dist.read_text("RECORD") or "").splitlines():
        first = line.partition(",")[0].partition("/")[0]
        if first and not first.endswith((".dist-info", ".data", ".pth")):
            tops.add(first.partition(".")[0])  # a package, module.py or module.cpython-311-x86_64-linux-gnu.so
    return tops


def answer(asked: Iterable[object]) -> dict[str, str | None]:
    """A worker's reply to a client asking which versions it has; the version or None, per name.

    The question comes from the network: only its first :data:`MAX_ASKED`
    items are read, and those that are not names of at most :data:`MAX_NAME`
    characters are skipped.  Each name is looked up on its own (a
    millisecond), not in the index of everything installed (half a second
    that a worker's first request would wait for).
    """
    out: dict[str, str | None] = {}
    for name in itertools.islice(asked, MAX_ASKED):
        if isinstance(name, str) and 0 < len(name) <= MAX_NAME:
            out[name] = _version(canonicalize_name(name))
    return out


@functools.cache
def _version(name: str) -> str | None:
    """The version of distribution ``name`` installed here (the first on ``sys.path``), or None."""
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


# --- whether a worker fits ---------------------------------------------------


def parse_requires(requires: Iterable[str | Requirement]) -> tuple[Requirement, ...]:
    """``requires=`` as requirements; a ValueError at the call site for a typo.

    Markers, extras and URLs are refused: a worker is judged only by the
    versions of its installed distributions, so a marker (whose environment
    would be the worker's, unknown here), an extra or a URL would be
    silently ignored; better to say so.
    """
    if isinstance(requires, (str, Requirement)):
        requires = [requires]
    out = []
    for item in requires:
        if isinstance(item, Requirement):
            req = item
        elif isinstance(item, str):
            try:
                req = Requirement(item)
            except InvalidRequirement as exc:
                raise ValueError(f"requires: {item!r} is not a requirement like 'numpy>=2': {exc}") from None
        else:
            raise ValueError(f"requires: expected strings like 'numpy>=2', not {type(item).__name__}")
        if req.marker is not None or req.extras or req.url:
            raise ValueError(f"requires: {str(req)!r} has a marker, extra or URL; "
                             f"give only a name and versions, like {req.name + str(req.specifier)!r}")
        out.append(req)
    return tuple(out)


@dataclass(frozen=True)
class Misfit:
    """Why a worker cannot run a task: the first of its mismatched distributions."""

    #: "missing": not installed; "unsatisfied": fails ``requires=``; "skew": another major version than the client's.
    kind: Literal["missing", "unsatisfied", "skew"]
    dist: str
    #: the client's version, or the specifier of ``requires=`` ("" for any version) when ``required``
    wanted: str
    found: str | None
    required: bool = False

    def describe(self) -> str:
        """One sentence for warnings and errors."""
        asked = (f"required{' as ' + self.dist + self.wanted if self.wanted else ''}" if self.required
                 else f"the client has {self.wanted}")
        if self.kind == "missing":
            return f"{self.dist} is not installed ({asked})"
        if self.kind == "unsatisfied":
            return f"{self.dist} {self.found} does not satisfy {self.dist}{self.wanted}"
        return f"{self.dist} {self.found} differs in major version from the client's {self.wanted}"

    def fix(self) -> str:
        """The command that makes this worker fit."""
        return install_command(self.dist, self.wanted or None)


def misfit(needs: Mapping[str, str], requires: Sequence[str] | Sequence[Requirement],
           have: Mapping[str, str | None], strict: bool = True) -> Misfit | None:
    """Why a worker with ``have`` cannot run a task, or None if it can; see :func:`misfits`."""
    return next(misfits(needs, requires, have, strict), None)


def misfits(needs: Mapping[str, str], requires: Sequence[str] | Sequence[Requirement],
            have: Mapping[str, str | None], strict: bool = True) -> Iterator[Misfit]:
    """Every reason a worker with ``have`` cannot run a task: missing first, then unsatisfied, then skew.

    ``needs``: canonical distribution -> the client's version, for what the
    task's pickle refers to.  ``requires``: the user's ``requires=``.
    ``have``: the worker's versions (None or absent: not installed).  With
    ``strict``, a different major version is a misfit: results may change
    silently.  Pre-releases satisfy a specifier, as installed versions do for pip.
    """
    reqs = parse_requires(requires)
    for req in reqs:
        if have.get(canonicalize_name(req.name)) is None:
            yield Misfit("missing", canonicalize_name(req.name), str(req.specifier), None, required=True)
    for dist, version in sorted(needs.items()):
        if have.get(dist) is None:
            yield Misfit("missing", dist, version, None)
    for req in reqs:
        found = have.get(canonicalize_name(req.name))
        if found is not None and not _satisfies(req, found):
            yield Misfit("unsatisfied", canonicalize_name(req.name), str(req.specifier), found, required=True)
    if strict:
        for dist, version in sorted(needs.items()):
            found = have.get(dist)
            if found is not None and _skewed(version, found):
                yield Misfit("skew", dist, version, found)


def _satisfies(req: Requirement, version: str) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _skewed(ours: str, theirs: str) -> bool:
    """Differ in major version, or for 0.x in minor (semver: before 1.0 a minor release may break).

    A version that does not parse is never called skewed: skew is a heuristic.
    """
    try:
        return _series(Version(ours)) != _series(Version(theirs))
    except InvalidVersion:
        return False


def _series(version: Version) -> tuple[int, ...]:
    release = version.release
    major = release[0]
    return (version.epoch, major) if major else (version.epoch, 0, release[1] if len(release) > 1 else 0)


_PLAIN = re.compile(r"[A-Za-z0-9._+!-]+")


def install_command(dist: str, version: str | None = None) -> str:
    """The command that installs ``dist`` at ``version`` (a version, a specifier like '>=2', or None for any)."""
    if not version:
        spec = dist
    elif version[0].isalnum():
        spec = f"{dist}=={version}"
    else:
        spec = f"{dist}{version}"
    if _PLAIN.fullmatch(dist) and "'" not in spec:
        return f"pip install '{spec}'"
    return f"pip install {shlex.quote(spec)}"
