"""The documentation keeps up with the code: every public name is in the API reference."""

from __future__ import annotations

import re
from pathlib import Path

import p2pexec

DOCS = Path(__file__).parents[1] / "docs"


def test_every_public_name_is_in_the_api_reference():
    reference = (DOCS / "reference" / "api.md").read_text()
    missing = [name for name in p2pexec.__all__ if not re.search(rf"\b{name}\b", reference)]
    assert not missing, f"in p2pexec.__all__ but not in docs/reference/api.md: {missing}"
