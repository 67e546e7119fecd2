"""The house's layers: pure cores import no I/O library, and nothing below the commands imports them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import p2pexec

PACKAGE = Path(p2pexec.__file__).parent
PURE = ["p2pexec.protocol.frames", "p2pexec.protocol.messages", "p2pexec.protocol.lease",
        "p2pexec.protocol.matching", "p2pexec.protocol.reach", "p2pexec.protocol.unusable",
        "p2pexec.protocol.resources", "p2pexec.protocol.observers", "p2pexec.protocol.sources",
        "p2pexec.protocol.values", "p2pexec.protocol.sharing", "p2pexec.worker.decisions",
        "p2pexec.worker.lease_decisions",
        "p2pexec.board.admission", "p2pexec.board.hub", "p2pexec.board.registry", "p2pexec.transport.admission",
        "p2pexec.board.actions", "p2pexec.board.logins", "p2pexec.board.access", "p2pexec.board.caps",
        "p2pexec.board.topics", "p2pexec.board.routing", "p2pexec.board.relay_address", "p2pexec.board.address",
        "p2pexec.membership", "p2pexec.pending", "p2pexec.chunks", "p2pexec.task_env", "p2pexec.client_state",
        "p2pexec.client_board", "p2pexec.client_timeouts", "p2pexec.client_core"]
IO = ["paramiko", "trio", "libp2p", "socket", "multiaddr"]
COMMANDS = {"p2pexec.cli", "p2pexec.worker_cli", "p2pexec.cli_common"}


@pytest.mark.parametrize("module", PURE)
def test_a_pure_core_imports_no_io_library(module):
    code = f"import sys, {module}; print(sorted(m for m in {IO!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", f"{module} pulls in {out.stdout.strip()}"


def test_nothing_below_the_commands_imports_them():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("p2pexec", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        if name in COMMANDS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = name.rsplit(".", node.level)[0] if node.level else ""
                target = f"{base}.{node.module}" if node.level else node.module
                targets = {target, *(f"{target}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            else:
                continue
            if targets & COMMANDS:
                offenders.append(f"{name} imports {sorted(targets & COMMANDS)}")
    assert offenders == []
