"""What one rank pays before its first step, today's code against an earlier commit's, side by side in
one run: the same tiny job (1 rank, 2 steps, export on) alternating between the two trees. The earlier
tree is `git archive` of BEFORE (the commit before ranks stopped importing DeepSpeed at export and
datasets/pandas to read the cache), run with PYTHONPATH pointing at it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from statistics import median

from bench.common import PY, ROOT, Setup
from hpcft.distenv import RUN_DIR_VAR
from hpcft.paths import RunPaths

BEFORE = "c85e0e7"  # the last commit whose ranks imported deepspeed (export) and datasets + pandas (cache)
WATCH = ("deepspeed", "datasets", "pandas", "peft")


def tree_at(rev: str, out: Path) -> Path:
    """hpcft/ as it was at `rev`, unpacked under out (once)."""
    dest = out / f"tree-{rev}"
    if not (dest / "hpcft").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "hpcft"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def import_seconds(importtime: str) -> tuple[float, set[str]]:
    """All import time of a process (`-X importtime`: the sum of its top-level entries' cumulative time)
    and the top-level packages it imported."""
    total, packages = 0, set()
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if cumulative.strip().isdigit() and name.startswith(" ") and not name.startswith("  "):
            total += int(cumulative)
        packages.add(name.strip().split(".")[0])
    return total / 1e6, packages


def one_rank(tree: Path, run_dir: Path, model: Path, data: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier bench's metrics.jsonl would be appended to
    env = {**os.environ, "PYTHONPATH": str(tree), RUN_DIR_VAR: str(run_dir), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    argv = [PY, "-X", "importtime", "-m", "hpcft.train", f"--model_name={model}", f"--data_path={data}",
            "--max_train_step=2", "--plot=false", "--keep_checkpoints=0"]
    start = time.time()
    proc = subprocess.run(argv, env=env, cwd=str(tree), capture_output=True, text=True, timeout=600)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"rank in {tree} exited {proc.returncode}: {proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in RunPaths(run_dir).metrics.read_text().splitlines() if '"loss"' in x]
    seconds, packages = import_seconds(proc.stderr)
    return {"to_first_step_s": rows[0]["time"] - start, "process_s": wall, "import_s": seconds,
            "imported": sorted(p for p in WATCH if p in packages)}


def rank_start(setup: Setup, before: str = BEFORE) -> dict:
    """Alternating runs of the same rank with today's tree and `before`'s; medians and ratios."""
    trees = {"before": tree_at(before, setup.out / "rankstart"), "now": ROOT}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    model, data = setup.model, ROOT / "data" / "samsum_tiny.jsonl"
    for rep in range(setup.reps + 1):  # the first pair warms the page cache and the data cache: dropped
        for name, tree in trees.items():
            got = one_rank(tree, setup.out / "rankstart" / f"{name}-{rep}", model, data)
            if rep:
                runs[name].append(got)
    med = {name: {k: median(r[k] for r in rs) for k in ("to_first_step_s", "process_s", "import_s")}
           for name, rs in runs.items()}
    return {"before": before, "runs": runs, "median": med, "imported": {k: rs[0]["imported"] for k, rs in runs.items()},
            "ratio_first_step": med["now"]["to_first_step_s"] / med["before"]["to_first_step_s"],
            "ratio_import": med["now"]["import_s"] / med["before"]["import_s"],
            "ratio_process": med["now"]["process_s"] / med["before"]["process_s"]}
