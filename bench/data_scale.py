"""Part 9, data at scale: a million SAMSum-like dialogues (`data/generate.py --samsum-long 1000000`) on a
2-node x 2-rank job of the local cluster (fp32, batching_strategy: packing), side by side in one run:

- today's path: the commit before the data cache (OLD_COMMIT, run from a `git archive` of it), where
  every rank reads, tokenizes and packs the whole file in Python; stopped as "did not fit" when a rank
  passes RSS_CAP;
- the new path, cache cold: rank 0's child process tokenizes once for the job, the others wait;
- the new path, cache warm, and a job on a 1,000-example file (warm too): the cache-hit start;
- per-rank peak RSS attributable to data: the 1M job's peak minus the 1,000-example job's, rank by rank.

Each job is timed from `hpcft submit` to its first optimizer step (metrics.jsonl's stamp); peak RSS
is each rank's VmHWM, read from /proc through the rank pid files while it runs. Jobs are cancelled
once their first step is measured. Packed throughput against HF Trainer is part 1 (vs_hf).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from bench.common import PY, ROOT, Setup, env_for
from hpcft.paths import RunPaths

OLD_COMMIT = "5109402"  # the last commit whose ranks read, tokenize and pack the JSONL themselves
RSS_CAP = 4 * 2**30  # a rank of today's path past this is stopped: "did not fit"
RANKS = 4  # 2 nodes x 2


def make_data(out: Path, n: int) -> Path:
    path = out / f"samsum_long_{n}.jsonl"
    if not path.exists():
        subprocess.run([PY, str(ROOT / "data" / "generate.py"), "--samsum-long", str(n), str(path)], check=True)
    return path


def old_tree(out: Path) -> Path:
    """Today's code, unpacked from git (the venv's packages serve both)."""
    tree = out / f"hpcft-{OLD_COMMIT}"
    if not (tree / "hpcft").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = out / f"hpcft-{OLD_COMMIT}.tar"
        subprocess.run(["git", "archive", "-o", str(archive), OLD_COMMIT], cwd=ROOT, check=True)
        with tarfile.open(archive) as t:
            t.extractall(tree, filter="data")
        archive.unlink()
    return tree


def spec_text(setup: Setup, out: Path, name: str, data: Path, cache: Path | None) -> str:
    train = {"model_name": str(setup.model), "data_path": str(data), "dataset": "samsum", "context_length": 512,
             "batch_size_training": 4, "batching_strategy": "packing", "max_train_step": 4, "run_validation": False,
             "save_model": False, "plot": False, "lr": 1e-4}
    if cache is not None:  # today's path has no such field
        train["data_cache_dir"] = str(cache)
    return json.dumps({"name": name, "output_dir": str(out), "train": train,
                       "resources": {"nodes": 2, "gpus_per_node": 2, "cpus_per_task": 2, "time": "01:00:00"}})


def _vm(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def watched_job(setup: Setup, name: str, data: Path, *, tree: Path = ROOT, cache: Path | None = None,
                timeout_s: float = 1800) -> dict:
    """Submit a 2x2 job with `tree`'s hpcft; watch every rank's RSS until the first optimizer step (or
    until a rank passes RSS_CAP, or timeout_s). Returns seconds to the first step and peak RSS per rank."""
    out = setup.out / "data_scale" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = out / "spec.yaml"
    spec.write_text(spec_text(setup, out, "job", data, cache))
    env = dict(env_for(1), PYTHONPATH=str(tree))
    t0 = time.time()
    proc = subprocess.run([PY, "-m", "hpcft.cli", "submit", str(spec)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"hpcft submit {spec} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    job = next(line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("job "))
    paths = RunPaths(out / "job" / job)
    peak = [0] * RANKS
    result: dict = {"job": job, "did_not_fit": False}
    try:
        while True:
            for r in range(RANKS):
                try:
                    pid = int(paths.rank_pid(r).read_text())
                except (OSError, ValueError):
                    continue
                peak[r] = max(peak[r], _vm(pid, "VmHWM") or 0)
            first = _first_step_time(paths)
            if first is not None:
                result["to_first_step_s"] = round(first - t0, 1)
                break
            if max(peak) > RSS_CAP:
                result.update(did_not_fit=True, stopped_after_s=round(time.time() - t0, 1))
                break
            if time.time() - t0 > timeout_s:
                result.update(did_not_fit=True, stopped_after_s=round(time.time() - t0, 1), timed_out=True)
                break
            if _ended(job):
                raise RuntimeError(f"job {job} ended before its first step; see {paths.run_dir}")
            time.sleep(0.25)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    logs = "".join(p.read_text(errors="replace") for _, p in paths.rank_logs())
    result.update(peak_rss_per_rank=peak, tokenizations=logs.count("hpcft.prepare: tokenizing"),
                  prepare_line=next((x for x in logs.splitlines() if "hpcft.prepare: tokenized" in x), None))
    return result


def _first_step_time(paths: RunPaths) -> float | None:
    try:
        for line in paths.metrics.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                return row["time"]
    except (OSError, ValueError):
        return None
    return None


def _ended(job: str) -> bool:
    from hpcft.jobs import TERMINAL, job_info

    info = job_info(job)
    return info is not None and info.state.split()[0] in TERMINAL


def data_scale(setup: Setup) -> dict:
    n = 20_000 if setup.quick else 1_000_000
    big, small = make_data(setup.out, n), make_data(setup.out, 1000)
    shutil.rmtree(setup.out / "data_scale", ignore_errors=True)
    cache = setup.out / "data_scale" / "data-cache"  # cold for the first new-path job of each file
    old = watched_job(setup, "old", big, tree=old_tree(setup.out))
    cold = watched_job(setup, "new_cold", big, cache=cache)
    small_cold = watched_job(setup, "small_cold", small, cache=cache)
    warm = watched_job(setup, "new_warm", big, cache=cache)
    small_warm = watched_job(setup, "small_warm", small, cache=cache)
    data_rss = [b - s for b, s in zip(warm["peak_rss_per_rank"], small_warm["peak_rss_per_rank"])]
    cold_rss = [b - s for b, s in zip(cold["peak_rss_per_rank"], small_warm["peak_rss_per_rank"])]
    return {"examples": n, "file_mib": round(big.stat().st_size / 2**20, 1), "old": old, "new_cold": cold,
            "small_cold": small_cold, "new_warm": warm, "small_warm": small_warm,
            "data_rss_per_rank_warm": data_rss, "data_rss_per_rank_cold": cold_rss,
            "cache_hit_start_gap_s": round(warm["to_first_step_s"] - small_warm["to_first_step_s"], 1),
            "targets": {"data_rss_mib": 300, "cache_hit_gap_s": 10, "tokenizations_per_job": 1},
            "old_commit": OLD_COMMIT, "rss_cap": RSS_CAP}
