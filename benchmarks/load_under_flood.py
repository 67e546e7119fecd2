"""Load: do 64 members' clients and 32 workers on one board keep working while strangers flood it?

    python benchmarks/load_under_flood.py [--json results.json]   (about 2 minutes on 2 cores)

The scenario is tests/load.py's (tests/test_load.py runs it in CI); this
prints what it measured: every client's results, the errors, and the board
process's CPU and memory under the two floods.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write_json  # noqa: E402
from tests.load import CLIENTS, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    report = run()
    print(json.dumps(report, indent=1))
    print("PASS" if report["all results right"] == CLIENTS else "FALLS SHORT")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
