"""The house's size bars (issue 17): no module over 500 lines, no class over 300, in p2pexec/."""

from __future__ import annotations

import ast
from pathlib import Path

import p2pexec

PACKAGE = Path(p2pexec.__file__).parent
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_modules_to_check():
    assert len(_modules()) > 50  # (a wrong PACKAGE would pass the bars below vacuously)


def test_no_module_is_over_500_lines():
    over = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert over == {}, "split these modules along a seam of responsibility (ARCHITECTURE.md)"


def test_no_class_is_over_300_lines():
    over = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (size := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                over[f"{path.relative_to(PACKAGE)}:{node.name}"] = size
    assert over == {}, "move a decision into a pure core, or one job into a class of its own"
