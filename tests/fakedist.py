"""Real installed distributions and virtual environments, made on disk for tests.

A client that has a package a worker lacks, or a worker with another
version, needs no network and no pip: :func:`write_distribution` lays out
an importable package with its ``.dist-info`` (what ``importlib.metadata``
and pip read), and :func:`make_venv` makes a Python whose ``sys.path`` is
the system's plus the directories given, so a worker started with it sees
exactly those fake distributions.

Name the directory ``site-packages`` (``tmp_path / "site-packages"``):
p2pexec sends code found anywhere else by value, as the user's own, and a
task would then need no distribution at all.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import p2pexec
from p2pexec import environment, own_code

#: The directory holding the p2pexec the tests import: a venv must import the same code.
REPO_ROOT = Path(p2pexec.__file__).resolve().parent.parent


def write_distribution(root: Path, name: str, version: str, module: str | None = None,
                       code: str = "") -> Path:
    """Install distribution ``name`` at ``version`` into directory ``root``, providing package ``module``.

    ``module`` defaults to ``name`` with dashes as underscores; its
    ``__init__.py`` sets ``__version__`` and then runs ``code``.  Returns
    ``root``, the directory to put on ``sys.path`` (or in :func:`make_venv`);
    name it ``site-packages`` for the package to count as installed.
    """
    module = module or name.replace("-", "_")
    root.mkdir(parents=True, exist_ok=True)
    package = root / module
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(f"__version__ = {version!r}\n{code}\n")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (info / "INSTALLER").write_text("fakedist\n")
    files = [package / "__init__.py", info / "METADATA", info / "top_level.txt", info / "INSTALLER"]
    rows = [f"{f.relative_to(root).as_posix()},sha256={_digest(f)},{f.stat().st_size}" for f in files]
    (info / "RECORD").write_text("\n".join([*rows, f"{info.name}/RECORD,,"]) + "\n")
    return root


def _digest(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


@contextmanager
def on_path(*dirs: Path) -> Iterator[None]:
    """``dirs`` first on this process's ``sys.path`` (imports and metadata see them), then as before."""
    before = list(sys.path)
    sys.path[:0] = [str(d) for d in dirs]
    _forget()
    try:
        yield
    finally:
        sys.path[:] = before
        for name in [m for m, mod in sys.modules.items() if any(_under(mod, d) for d in dirs)]:
            del sys.modules[name]
        _forget()


def _forget() -> None:
    """Drop what p2pexec cached about installed code and the modules' places."""
    importlib.invalidate_caches()
    environment.refresh()
    own_code.is_local_module.cache_clear()


def _under(module: object, directory: Path) -> bool:
    path = getattr(module, "__file__", None)
    return bool(path) and Path(path).is_relative_to(directory)


def make_venv(path: Path, site_dirs: Iterable[Path] = ()) -> Path:
    """A real virtual environment at ``path`` seeing the system's packages plus ``site_dirs``; its python.

    Made with ``--system-site-packages --without-pip`` (fast, no network);
    ``site_dirs`` go in a ``.pth`` file of its site-packages, after
    :data:`REPO_ROOT`, so it imports this checkout's p2pexec even where the
    editable install points elsewhere.  Entries of a ``.pth`` come after
    the venv's own site-packages but before the system's, so a
    distribution in ``site_dirs`` shadows a system one of the same name.
    """
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, capture_output=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    lines = [str(REPO_ROOT), *(str(Path(d).resolve()) for d in site_dirs)]
    (Path(purelib) / "_fakedist.pth").write_text("\n".join(lines) + "\n")
    return python
