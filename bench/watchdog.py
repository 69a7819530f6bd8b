"""Part 8: what hang triage costs: step time with the progress watchdog on (train.hang_timeout_s 300:
phase marks, heartbeat thread and file, faulthandler backstop) and off (0: phase marks only), side by
side in one run, alternating; plus the phase marks themselves, timed in this process."""
from __future__ import annotations

import json
import time

from bench.common import Setup, hpcft_run, median


def step_seconds(run_dir, warmup: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return median([r["seconds"] for r in rows if r["step"] > warmup])


def phase_mark_seconds(calls: int = 200_000) -> float:
    from hpcft.train.watchdog import Progress

    p = Progress()
    names = ("data", "forward", "backward", "optimizer")
    t = time.perf_counter()
    for i in range(calls):
        p.phase(names[i & 3])
    return (time.perf_counter() - t) / calls


def watchdog_cost(setup: Setup) -> dict:
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for rep in range(setup.reps):
        for case, timeout in (("on", 300), ("off", 0)):
            name = f"watchdog/{case}_{rep}"
            hpcft_run(setup, name, hang_timeout_s=timeout)
            runs[case].append(step_seconds(setup.out / "runs" / name, setup.warmup))
    med = {k: median(v) for k, v in runs.items()}
    mark = phase_mark_seconds()
    marks_per_step = 6  # data, forward, backward, optimizer, step_end, metrics
    return {"runs": runs, "median_step_s": med, "ratio": med["on"] / med["off"], "target": 1.01,
            "phase_mark_s": mark, "phase_marks_share": marks_per_step * mark / med["off"]}
