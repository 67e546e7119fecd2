"""The worker daemon never unpickles task payloads: it does not even load dill."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(60)


def test_daemon_import_graph_has_no_unpickler():
    code = ("import sys, p2pexec.cli, p2pexec.worker.daemon; "
            "print(sorted(m for m in sys.modules if m == 'dill' or m.startswith('dill.') or m == 'p2pexec.tasks'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_is_fast_and_does_not_load_libp2p():
    code = "import sys; from p2pexec.cli import worker_main; print('libp2p' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    started = time.perf_counter()
    done = subprocess.run(["p2pexec-worker", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--cluster" in done.stdout and "--slots" in done.stdout
    assert time.perf_counter() - started < 30  # loose: only catches a hang, not a timing target


def test_demo_command_runs_the_full_path():
    done = subprocess.run(["p2pexec", "demo", "--workers", "2", "--tasks", "8"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[0, 1, 4, 9, 16, 25, 36, 49]" in done.stdout
    assert re.search(r"^workers used: [12] of 2$", done.stdout, re.MULTILINE)
