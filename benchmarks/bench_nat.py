"""Across home routers, in the NAT lab: time to first result per row, and throughput relayed and upgraded
beside a raw py-libp2p stream over the same path, in the same run.

    python benchmarks/bench_nat.py [--mib 64] [--repeat 3] [--json results.json]

Needs root, iproute2 and iptables (network namespaces; see tests/lab).
Rows: worker and client each public (w, k) or behind a NAT (b, c); the board
and its relay on the public segment.  "First result" is from creating the
P2PExecutor to the result of its first submit (import excluded), the
executor's whole start included: board, relay ticket, request, offer,
dial (direct, or relayed for a NATed worker), task.

Throughput is an echo of ``--mib`` MiB counted both ways.  Relayed: a lab
whose NAT randomizes ports, so hole punching fails and the lease stays on
the relay.  Upgraded: a normal lab, measured once the lease moved onto the
hole-punched connection.  The raw baselines echo over a plain py-libp2p
stream (TCP, Noise, yamux; pipelined, no encryption or pickling of ours)
between the same two namespaces, through a relay in the same place.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import write_json  # noqa: E402

from tests.lab.harness import LabCluster, NatLab, lab_unavailable  # noqa: E402

NAT_JOB = str(HERE / "nat_job.py")
ROWS = [("w", "k"), ("w", "b"), ("b", "w"), ("b", "c")]
NAMES = {"w": "public", "k": "public", "b": "NAT", "c": "NAT"}


def _json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in:\n{text[-3000:]}")


def first_results(lc: LabCluster, repeat: int, rows: list[tuple[str, str]], nat: str = "NAT") -> dict[str, dict]:
    out: dict[str, dict] = {}
    names = {**NAMES, "b": nat}
    for worker_ns, client_ns in rows:
        worker = lc.start_worker(worker_ns, name=f"{worker_ns}-first")
        runs = [lc.run_client(client_ns, tasks=1, timeout=60, log_level=None) for _ in range(repeat)]
        lc.lab.stop(worker)
        lc.workers.remove(worker)
        bad = [r for r in runs if "error" in r]
        if bad:
            raise RuntimeError(f"row {worker_ns}->{client_ns} failed: {bad[0]['error']}\n{bad[0].get('log', '')[-3000:]}")
        row = f"worker {names[worker_ns]} ({worker_ns}), client {names[client_ns]} ({client_ns})"
        out[row] = {"first_result_s": round(statistics.median(r["first_result_s"] for r in runs), 3),
                    "runs_s": [r["first_result_s"] for r in runs],
                    "import_s": round(statistics.median(r["import_s"] for r in runs), 3)}
        print(f"{row:<56} first result {out[row]['first_result_s'] * 1000:6.0f} ms "
              f"(runs {[round(r * 1000) for r in out[row]['runs_s']]} ms; import of p2pexec "
              f"{out[row]['import_s']:.2f} s not counted)", flush=True)
    return out


def p2p_echo(lc: LabCluster, mib: int, wait_upgrade: bool) -> dict:
    worker = lc.start_worker("b", name=f"echo-{wait_upgrade}")
    config = {"cluster": lc.cluster, "board": lc.board_url(lc.owner), "identity": str(lc.identity(lc.owner)),
              "members": str(lc.members), "known_hosts": str(lc.known_hosts), "mib": mib,
              "wait_upgrade": wait_upgrade}
    proc = lc.lab.spawn("c", [sys.executable, NAT_JOB, "p2p-client", json.dumps(config)], env=lc.env(),
                        log_name=f"p2p-echo-{wait_upgrade}")
    proc.wait(600)
    result = _json_line(lc.lab.output(proc))
    lc.lab.stop(worker)
    lc.workers.remove(worker)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def raw_echo(lab: NatLab, lc: LabCluster, mib: int) -> dict:
    relay = lab.spawn("pub", [sys.executable, NAT_JOB, "raw-relay", "4002"], env=lc.env(), log_name="raw-relay")
    address = lab.wait_for_output(relay, r"^relay (\S+)", 30).group(1)
    server = lab.spawn("b", [sys.executable, NAT_JOB, "raw-server", address], env=lc.env(), log_name="raw-server")
    info = lab.wait_for_output(server, r"^server (.+)$", 30).group(1)
    client = lab.spawn("c", [sys.executable, NAT_JOB, "raw-client", info, str(mib)], env=lc.env(),
                       log_name="raw-client")
    client.wait(600)
    result = _json_line(lab.output(client))
    lab.stop(server)
    lab.stop(relay)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="echo size for throughput (default: 64)")
    parser.add_argument("--repeat", type=int, default=3, help="clients per row for first-result times (default: 3)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reason = lab_unavailable()
    if reason:
        print(f"bench_nat: {reason}", file=sys.stderr)
        return 2
    results: dict = {}
    with NatLab() as lab, LabCluster(lab) as lc:
        results["first_result"] = first_results(lc, args.repeat, ROWS)
        upgraded = p2p_echo(lc, args.mib, wait_upgrade=True)
        raw = raw_echo(lab, lc, args.mib)
    with NatLab(random_ports=True) as lab, LabCluster(lab) as lc:
        results["first_result"].update(first_results(lc, args.repeat, [("b", "c")], nat="port-randomizing NAT"))
        relayed = p2p_echo(lc, args.mib, wait_upgrade=False)
        raw_relayed = raw_echo(lab, lc, args.mib)
    def path(mine: float, **baselines: float | None) -> dict:
        return {"p2pexec": mine, **{f"raw_{k}": v for k, v in baselines.items()},
                **{f"ratio_{k}": round(mine / v, 2) if v else None for k, v in baselines.items()}}

    results["throughput_MBps"] = {
        "relayed": path(relayed["MBps"], pipelined=raw_relayed["relayed_MBps"],
                        store_and_forward=raw_relayed.get("relayed_stored_MBps"),
                        sealed=raw_relayed.get("relayed_sealed_MBps")),
        "upgraded": path(upgraded["MBps"], pipelined=raw["direct_MBps"], store_and_forward=raw["direct_stored_MBps"],
                         sealed=raw["direct_sealed_MBps"]),
    }
    print(f"{args.mib} MiB echo, NATed worker (b) and client (c), both directions counted; raw py-libp2p "
          f"over the same path: echoing as it reads (pipelined), storing first (as a task must), and storing "
          f"first with sealing and opening on both sides as a lease does (what p2pexec must add):")
    for name, t in results["throughput_MBps"].items():
        print(f"  {name:<9} p2pexec {t['p2pexec']:6.1f} MB/s; raw: pipelined {t['raw_pipelined']} "
              f"({t['ratio_pipelined']}x), store-and-forward {t['raw_store_and_forward']} "
              f"({t['ratio_store_and_forward']}x), + sealing {t['raw_sealed']} "
              f"({t['ratio_sealed']}x)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
