"""Notebooks as a tested platform: a real Jupyter kernel (nbclient) runs cells as a data scientist would."""

from __future__ import annotations

import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("tqdm")

pytestmark = pytest.mark.timeout(240)

CELLS = [
    "from p2pexec import LocalCluster\nlc = LocalCluster(workers=2)\nlc.start()\nex = lc.executor()",
    "def square(x):\n    return x * x\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n\n"
    "class CellError(Exception):\n    pass\n\ndef fail(m):\n    raise CellError(m)",
    "print(sorted(ex.map(square, range(5))))",
    "p = ex.submit(Point, 3).result(timeout=60)\nprint(type(p) is Point, p.x)",
    "try:\n    ex.submit(fail, 'caught').result(timeout=60)\nexcept CellError as e:\n    print('caught', e)",
    "print(ex.submit(lambda y: y + 1, 41).result(timeout=60))",
    "from concurrent.futures import as_completed\nfrom tqdm.auto import tqdm\n"
    "fs = [ex.submit(square, i) for i in range(20)]\n"
    "print(sum(f.result() for f in tqdm(as_completed(fs), total=len(fs))))",
    "print('workers', *[w.pid for w in lc.workers], 'dir', lc._dir)",
]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_notebook_uses_the_cluster_and_a_kernel_restart_leaves_nothing_behind(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3", resources={
        "metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
        outputs = [_text(cell) for cell in notebook.cells]
        assert outputs[2].strip() == "[0, 1, 4, 9, 16]"
        assert outputs[3].strip() == "True 3"  # a cell's class comes home as itself
        assert outputs[4].strip() == "caught caught"  # and a cell's exception is caught by its class
        assert outputs[5].strip() == "42"
        assert outputs[6].strip().endswith("2470") and "20/20" in "".join(  # tqdm drew its bar on stderr
            o.get("text", "") for o in notebook.cells[6].outputs)
        words = outputs[7].split()
        pids, directory = [int(w) for w in words[1:words.index("dir")]], words[-1]
        from jupyter_core.utils import run_sync

        run_sync(client.km.restart_kernel)(now=True)  # what "Restart kernel" does: the LocalCluster is never closed
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (all(_gone(p) for p in pids) and not os.path.exists(directory)):
            time.sleep(0.1)  # polling /proc: there is no event for another process's end
    assert all(_gone(p) for p in pids), pids
    assert not os.path.exists(directory)
