"""What every benchmark script shares: where its results go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
