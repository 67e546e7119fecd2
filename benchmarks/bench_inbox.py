"""Inbox cost per message with 1,000 and with 100,000 live (unexpired) message ids remembered.

    python benchmarks/bench_inbox.py [--live 1000 100000] [--measure 5000] [--json results.json]

Steady state, as under a flood that lasts: the remembered ids expire evenly
over the next MAX_LIFETIME seconds and the clock moves so that about one
expires for each new message, so every figure includes pruning.  Measured
twice: ``Inbox.receive`` of fresh signed lines (parsing and the signature
check included, as a receiver pays them) and ``SeenIds`` alone.  The ratio
is the point: the cost must not grow with the number of ids (before, past
4,096 ids every message rebuilt the whole table).  Best of three runs.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from _common import write_json
from nacl.signing import SigningKey

from p2pexec.keys import Identity, Keyring, openssh_public_line
from p2pexec.protocol.messages import MAX_LIFETIME, Inbox, SeenIds, encode

CLUSTER = "alice/bench"
NOW = 1_800_000_000.0
REPEAT = 3


def filled(live: int, measure: int) -> SeenIds:
    """``live`` ids expiring one every MAX_LIFETIME / live seconds from NOW on."""
    seen = SeenIds(live + measure)
    step = MAX_LIFETIME / live
    for i in range(live):
        seen.add(f"old{i:021x}", NOW + (i + 1) * step)
    return seen


def receive_us(live: int, measure: int, identity: Identity, keyring: Keyring) -> float:
    step = MAX_LIFETIME / live
    batch = [encode(identity, CLUSTER, "withdraw", {"req": "r"}, now=NOW + i * step, ttl=MAX_LIFETIME)
             for i in range(measure)]
    best = float("inf")
    for _ in range(REPEAT):
        inbox = Inbox(CLUSTER, keyring)
        inbox._seen = filled(live, measure)  # noqa: SLF001 -- signing 100,000 lines to fill it takes minutes
        gc.collect()
        started = time.perf_counter()
        for i, line in enumerate(batch):
            assert inbox.receive(line, NOW + i * step) is not None
        best = min(best, time.perf_counter() - started)
        assert abs(len(inbox._seen) - live) <= live // 100 + 2  # noqa: SLF001 -- steady, as meant
    return best / measure * 1e6


def seen_us(live: int, measure: int) -> float:
    step = MAX_LIFETIME / live
    ids = [f"new{i:021x}" for i in range(measure)]
    best = float("inf")
    for _ in range(REPEAT):
        seen = filled(live, measure)
        gc.collect()
        started = time.perf_counter()
        for i, msg_id in enumerate(ids):
            now = NOW + i * step
            seen.prune(now)
            if msg_id not in seen:
                seen.add(msg_id, now + MAX_LIFETIME)
        best = min(best, time.perf_counter() - started)
    return best / measure * 1e6


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, nargs=2, default=[1000, 100_000])
    parser.add_argument("--measure", type=int, default=5000)
    parser.add_argument("--json")
    args = parser.parse_args()
    identity = Identity("alice", SigningKey.generate())
    keyring = Keyring.parse(f"alice {openssh_public_line(identity.public_key)}\n")
    rows = [{"live": n, "receive_us": receive_us(n, args.measure, identity, keyring),
             "seen_us": seen_us(n, args.measure)} for n in args.live]
    gc.collect()
    before = rss_kib()
    full = filled(args.live[1], 0)
    memory = rss_kib() - before
    del full
    small, large = rows
    results = {"rows": rows, "receive_ratio": large["receive_us"] / small["receive_us"],
               "seen_ratio": large["seen_us"] / small["seen_us"], "seen_rss_kib": memory}
    for row in rows:
        print(f"{row['live']:>7,} live ids: Inbox.receive {row['receive_us']:6.1f} us/message, "
              f"SeenIds {row['seen_us']:5.2f} us/message")
    print(f"ratio {large['live']:,} vs {small['live']:,}: Inbox.receive {results['receive_ratio']:.2f}x, "
          f"SeenIds {results['seen_ratio']:.2f}x")
    print(f"{large['live']:,} remembered ids take {memory / 1024:.1f} MiB")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
