"""Part 11: what a checkpoint costs training, sync vs train.async_checkpoint, side by side.

Three runs per repeat and strategy, alternating: no saves, a save every 3 steps written synchronously,
the same written by DCP's async save. Short steps (context 128, batch 2) so that a save of the model and
its AdamW state (~320 MiB) is not lost in a step's noise. A save runs after step N's metrics row, so
its blocking part lands in step N+1's `seconds`:
- blocked: the time the save call held training up, as the run records it (metrics.jsonl's
  checkpoint event: sync, the whole write; async, the staging copy and the previous save's end);
- stall: step N+1's time minus the no-save run's median step;
- write: async only, from the save's start until the background write was published;
- cost per save: the extra wall time of the whole window over the no-save run, per save (an async
  write that competes with training for these 2 cores shows up here, not in the stall)."""
from __future__ import annotations

import json
import statistics

from bench.common import Setup, hpcft_run, median
from hpcft.paths import RunPaths

EVERY = 3
SHAPE = dict(context_length=128, batch_size_training=2)


def read(run_dir) -> tuple[dict[int, float], list[dict]]:
    """Step -> seconds, and the checkpoint events."""
    rows = [json.loads(line) for line in RunPaths(run_dir).metrics.read_text().splitlines()]
    steps = {r["step"]: r["seconds"] for r in rows if "loss" in r and "seconds" in r and r.get("event") is None}
    return steps, [r for r in rows if r.get("event") in ("checkpoint", "checkpoint_written")]


def after_save(step: int, warmup: int) -> bool:
    return step > warmup + 1 and (step - 1) % EVERY == 0


def costs(steps: dict[int, float], events: list[dict], plain: dict[int, float], warmup: int) -> dict:
    """Against the no-save run of the same repeat: the stall of each step after a save, the cost per save."""
    blocked = [e["blocked_s"] for e in events if e["event"] == "checkpoint"]
    written = [e["write_s"] for e in events if e["event"] == "checkpoint_written"]
    base = statistics.median(t for s, t in plain.items() if s > warmup)
    saves = [s for s in steps if after_save(s, warmup)]
    window = [s for s in steps if s > warmup]
    extra = sum(steps[s] for s in window) - sum(plain[s] for s in window if s in plain)
    return {"blocked_s": statistics.mean(blocked), "write_s": statistics.mean(written) if written else None,
            "stalls_s": [steps[s] - base for s in saves], "stall_s": statistics.mean(steps[s] - base for s in saves),
            "cost_per_save_s": extra / len(saves), "saves": len(saves), "step_s": base}


def checkpoint_stall(setup: Setup) -> dict:
    steps = setup.warmup + 4 * EVERY - 1  # saves after steps 3, 6, 9 (quick: fewer), the window after warm-up
    rows = []
    for strategy in ("ddp", "fsdp"):
        found: dict[str, list[dict]] = {"sync": [], "async": []}
        for rep in range(setup.reps):
            runs = {}
            for mode in ("none", "sync", "async"):
                name = f"checkpoint/{strategy}_{mode}_{rep}"
                hpcft_run(setup, name, strategy=strategy, save_every=EVERY if mode != "none" else 0, keep_checkpoints=2,
                          async_checkpoint=mode == "async", max_train_step=steps, **SHAPE)
                runs[mode] = read(setup.out / "runs" / name)
            for mode in ("sync", "async"):
                found[mode].append(costs(*runs[mode], runs["none"][0], setup.warmup))
        row = {"strategy": strategy}
        for mode, per in found.items():
            row[mode] = {k: median([p[k] for p in per]) for k in ("blocked_s", "stall_s", "cost_per_save_s", "step_s")}
            row[mode]["write_s"] = median([p["write_s"] for p in per if p["write_s"] is not None]) if mode == "async" else None
            row[mode]["runs"] = per
        row["blocked_ratio"] = row["async"]["blocked_s"] / row["sync"]["blocked_s"]
        row["stall_ratio"] = row["async"]["stall_s"] / row["sync"]["stall_s"]
        row["cost_ratio"] = row["async"]["cost_per_save_s"] / row["sync"]["cost_per_save_s"]
        rows.append(row)
    return {"rows": rows, "every": EVERY, "shape": SHAPE, "steps": steps}
