"""Where a test run's CPU went: the lines tests/conftest.py appends to HPCFT_TEST_CPU_LOG, summed.

    python -m tests.cpu_report LOG [--top N] [--since BUSY_S]

Prints the machine's CPU-seconds over the whole run when --since gives /proc/stat's busy count at its start
(envs/test.sh does), and the N tests whose runs saw the most CPU."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.conftest import machine_busy_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cpu_report")
    ap.add_argument("log", type=Path)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--since", type=float, help="machine busy CPU-seconds at the start of the run")
    args = ap.parse_args(argv)
    try:
        rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    except OSError as exc:
        print(f"cpu_report: no CPU log: {exc}", file=sys.stderr)
        return 1
    if args.since is not None:
        print(f"machine CPU over the whole run: {machine_busy_s() - args.since:,.0f} CPU-s")
    total = sum(r["machine_cpu_s"] for r in rows)
    print(f"{len(rows)} tests; CPU-s seen while each ran, summed: {total:,.0f} (tests that ran side by side "
          f"count each other's)")
    for r in sorted(rows, key=lambda r: r["machine_cpu_s"], reverse=True)[:args.top]:
        print(f"{r['machine_cpu_s']:8.1f} CPU-s {r['wall_s']:8.1f} s  {r['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
