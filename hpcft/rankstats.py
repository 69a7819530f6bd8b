"""Per-rank step statistics and stragglers: pure functions shared by the ranks (the rank-0 notice
during the run, summary.json) and `hpcft logs --stats RUN` (from the heartbeat files).

Under synchronous data parallelism every rank's wall-clock step time is the same: the fast ranks wait
for the slow one in the gradient all-reduce. What differs is each rank's own busy time: data wait
plus forward, the part of a step before any rank waits for another (DDP's forward runs no collective,
and the backward that holds the gradient all-reduce is left out). A rank whose median busy time is
above STRAGGLER_FACTOR x the world's median is a straggler.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping, Sequence

STRAGGLER_FACTOR = 1.2


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else 0.0


def step_stats(busy: Sequence[float], wall: Sequence[float], data_wait_s: float) -> dict:
    """One rank's numbers: busy (own) and wall step time, median and p95 over the steps given."""
    return {"steps": len(wall), "busy_median_s": round(median(busy), 6), "busy_p95_s": round(percentile(busy, 95), 6),
            "step_median_s": round(median(wall), 6), "step_p95_s": round(percentile(wall, 95), 6),
            "data_wait_s": round(data_wait_s, 6)}


def stragglers(busy_medians: Mapping[int, float], factor: float = STRAGGLER_FACTOR) -> list[int]:
    """Ranks whose median busy time is above factor x the world's median, slowest first."""
    world = median(busy_medians.values())
    if world <= 0:
        return []
    slow = [r for r, m in busy_medians.items() if m > factor * world]
    return sorted(slow, key=lambda r: -busy_medians[r])


def straggler_line(busy_medians: Mapping[int, float], step: int, window: int) -> str | None:
    """The rank-0 log line naming stragglers, or None when there are none."""
    slow = stragglers(busy_medians)
    if not slow:
        return None
    world = median(busy_medians.values())
    named = ", ".join(f"rank {r} ({busy_medians[r]:.3f} s, {busy_medians[r] / world:.1f}x)" for r in slow)
    return (f"hpcft.train: straggler at step {step}: {named}; the world's median busy time is {world:.3f} s "
            f"per step over the last {window} steps (data wait + forward, > {STRAGGLER_FACTOR}x is named)")


def rank_summary(per_rank: Sequence[dict]) -> dict:
    """summary.json's view of every rank's step_stats (each with its rank and host): the table, the
    data wait per node and the stragglers of the whole run."""
    rows = sorted(per_rank, key=lambda d: d["rank"])
    nodes: dict[str, float] = {}
    for d in rows:
        nodes[d.get("host") or "?"] = round(nodes.get(d.get("host") or "?", 0.0) + d["data_wait_s"], 6)
    return {"step_time_per_rank": rows, "data_wait_s_per_node": nodes,
            "stragglers": stragglers({d["rank"]: d["busy_median_s"] for d in rows})}


def format_stats(summary: dict) -> list[str]:
    """`hpcft logs --stats`: one line per rank, the data wait per node, the stragglers."""
    slow = set(summary["stragglers"])
    lines = [f"{'rank':>5} {'host':<12} {'steps':>6} {'busy median':>12} {'busy p95':>9} {'step median':>12} "
             f"{'step p95':>9} {'data wait':>10}"]
    for d in summary["step_time_per_rank"]:
        lines.append(f"{d['rank']:>5} {d.get('host') or '?':<12} {d['steps']:>6} {d['busy_median_s']:>11.3f}s "
                     f"{d['busy_p95_s']:>8.3f}s {d['step_median_s']:>11.3f}s {d['step_p95_s']:>8.3f}s "
                     f"{d['data_wait_s']:>9.2f}s{'  straggler' if d['rank'] in slow else ''}")
    lines.append("data wait per node: " + ", ".join(f"{h} {s:.2f} s" for h, s in summary["data_wait_s_per_node"].items()))
    lines.append("stragglers (busy median > 1.2x the world's): "
                 + (", ".join(f"rank {r}" for r in summary["stragglers"]) or "none"))
    return lines
