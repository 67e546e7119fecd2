"""What every benchmark script shares: how it judges a target, where its results go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def verdict(ok: bool) -> str:
    """What a benchmark says of a target it measured."""
    return "pass" if ok else "falls short"


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
