"""Every benchmark in one run, each beside its baseline: one table, one JSON file.

    python benchmarks/run_all.py [--json benchmarks/results/latest.json] [--quick]

Runs bench_executor (vs ProcessPoolExecutor(2)), bench_roundtrip_floor (vs loky and a raw py-libp2p
ping-pong), bench_payload (vs a raw py-libp2p stream), bench_scale (32 workers), bench_joblib (vs loky) and, where network namespaces
can be made (root), bench_nat (the NAT lab, vs raw py-libp2p over the same
paths) in turn, each in its own subprocess so that one's processes and
memory do not skew the next.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(HERE / script), "--json", out.name, *args], check=True, timeout=1800)
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    quick = args.quick
    results = {
        "executor": run("bench_executor.py", *(["--roundtrips", "100", "--items", "1000"] if quick else [])),
        "roundtrip_floor": run("bench_roundtrip_floor.py", *(["--roundtrips", "500", "--rounds", "1"] if quick else [])),
        "payload": run("bench_payload.py", "--mib", "32" if quick else "256"),
        "scale": run("bench_scale.py", *(["--workers", "4", "--tasks", "1000"] if quick else [])),
        "joblib": run("bench_joblib.py", *(["--calls", "2000", "--repeat", "1"] if quick else [])),
    }
    sys.path.insert(0, str(HERE.parent))
    from tests.lab.harness import lab_unavailable

    reason = lab_unavailable()
    if reason:
        print(f"\nskipping bench_nat: {reason}")
    else:
        results["nat"] = run("bench_nat.py", *(["--mib", "16", "--repeat", "1"] if quick else []))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nall results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
