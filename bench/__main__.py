"""hpcft benchmarks: one command, every measure side by side in one run on this machine.

    bash bench/run.sh            # set-up, local cluster, the full run (~80 min on 2 cores), cluster down
    python -m bench [--quick] [--parts vs_hf,mfu,profile,scaling,launch,memory,logs,strategies,watchdog,data,compile,checkpoint] [--results DIR]

Prints a table and writes results.json, results.md and PNG plots (default bench/results/; --quick
writes to artifacts/bench/quick/). Parts 3 (the 2-node case), 4 and 9 (data) need the local Slurm
cluster (envs/local-cluster.sh up) and SLURM_CONF in the environment. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from bench import ckpt_stall, compiled, data_scale, logtriage, memory, rankstart, report, scaling, throughput, watchdog
from bench.common import ROOT, hpcft_run, median, prepare

PARTS = ("vs_hf", "mfu", "profile", "scaling", "launch", "memory", "logs", "strategies", "watchdog", "data", "compile",
         "checkpoint")


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and one repeat: a smoke run, not numbers")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"), help="runs, model, data, synthetic logs")
    ap.add_argument("--results", default=None, help="where results.json and plots go")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other parts' results already in the results directory (each part is still "
                         "measured side by side within itself; the machine line records this run)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"bench: error: --parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    work = Path(args.work)
    results_dir = Path(args.results) if args.results else (work / "quick" if args.quick else ROOT / "bench" / "results")
    setup = prepare(work, quick=args.quick)
    r: dict = {"machine": machine(), "config": throughput.describe(setup), "quick": args.quick, "seconds": {}}
    old = results_dir / "results.json"
    if args.merge and old.exists():
        kept = json.loads(old.read_text())
        r = {**{k: v for k, v in kept.items() if k not in parts}, **r,
             "seconds": {k: v for k, v in kept.get("seconds", {}).items() if k not in parts},
             "failed": {k: v for k, v in kept.get("failed", {}).items() if k not in parts}}
        r["machine_earlier"] = kept.get("machine")
        if not r["failed"]:
            del r["failed"]

    def part(name, fn):
        """Run one part; a failure is recorded and the others still run. results.json is rewritten
        after every part, so a crash late in a long run keeps what was measured."""
        if name not in parts:
            return
        t = time.perf_counter()
        print(f"bench: {name} ...", flush=True)
        try:
            r[name] = fn()
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            r.setdefault("failed", {})[name] = str(exc)[-3000:]
            print(f"bench: {name} FAILED: {str(exc)[-1500:]}", file=sys.stderr, flush=True)
        r["seconds"][name] = round(time.perf_counter() - t, 1)
        report.write_json(r, results_dir)
        print(f"bench: {name} done in {r['seconds'][name]:.0f} s", flush=True)

    part("vs_hf", lambda: throughput.vs_hf(setup))

    def mfu():
        fp32 = r["vs_hf"]["median"]["hpcft_packing"] if "vs_hf" in r else median(
            [hpcft_run(setup, f"mfu/fp32_{i}")["tokens_per_s_steady"] for i in range(setup.reps)])
        bf16 = [hpcft_run(setup, f"mfu/bf16_{i}", precision="bf16") for i in range(setup.reps)]
        return throughput.mfu(setup, {"fp32": fp32, "bf16": median([s["tokens_per_s_steady"] for s in bf16])},
                              throughput.measure_peaks(), bf16[0]["parameters"])

    part("mfu", mfu)
    part("profile", lambda: throughput.profile(setup, r.get("mfu", {}).get("parameters") or 28_158_464))
    part("scaling", lambda: scaling.scaling(setup))
    part("launch", lambda: {**scaling.launch_overhead(setup), "rank_start": rankstart.rank_start(setup)})
    part("memory", lambda: memory.memory(setup))
    part("logs", lambda: logtriage.triage(work, args.quick))
    part("strategies", lambda: throughput.strategy_table(setup))
    part("watchdog", lambda: watchdog.watchdog_cost(setup))
    part("data", lambda: data_scale.data_scale(setup))
    # the peaks part 2 measured in this run, else measured now (never an earlier run's, merged or not)
    part("compile", lambda: compiled.compiled(setup, r["mfu"]["peaks"] if "mfu" in parts and "mfu" in r
                                              else throughput.measure_peaks()))
    part("checkpoint", lambda: ckpt_stall.checkpoint_stall(setup))
    files = report.write(r, results_dir)
    report.print_table(report.summary_rows(r))
    print("bench: wrote " + ", ".join(str(f) for f in files))
    if r.get("failed"):
        print(f"bench: failed parts: {', '.join(r['failed'])} (see results.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
