"""What every benchmark part shares: the bench model and data, running the hpcft entrypoint or the
HF Trainer baseline under torchrun, and reading throughput back from what the runs wrote."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpcft.distenv import RUN_DIR_VAR
from hpcft.paths import RunPaths
from hpcft.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: the model, data and the per-rank batch every part uses."""
    out: Path  # artifacts/bench: runs, synthetic logs, results
    model: Path
    data: Path
    context: int = 512
    batch: int = 4
    steps: int = 12  # optimizer steps per throughput run
    warmup: int = 2  # steps left out of the throughput window
    reps: int = 3  # repeats of each side-by-side comparison
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def train_flags(self, **overrides) -> list[str]:
        fields = dict(context_length=self.context, batch_size_training=self.batch, max_train_step=self.steps)
        return bench_config(self.model, self.data, **{**fields, **overrides}).to_args()


def bench_config(model: Path | str, data: Path | str, **overrides) -> TrainConfig:
    """The training config every part measures: packed SAMSum-like data, no eval, no export."""
    fields = dict(model_name=str(model), data_path=str(data), dataset="samsum", context_length=512,
                  batch_size_training=4, batching_strategy="packing", run_validation=False, save_model=False,
                  plot=False, lr=1e-4, lr_scheduler="cosine", seed=42)
    fields.update(overrides)
    return TrainConfig(**fields)


def prepare(out: Path, *, quick: bool) -> Setup:
    """A ~27M-parameter Llama (hidden 512, 8 layers) and 2,000 SAMSum-like dialogues with a long tail of
    lengths, both built here from seeds: no hub."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "samsum_long.jsonl"
    if not data.exists():
        subprocess.run([PY, str(ROOT / "data" / "generate.py"), "--samsum-long", "2000", str(data)], check=True)
    model = out / "llama-27m"
    if not (model / "config.json").exists():
        subprocess.run([PY, "-m", "hpcft.cli", "make-tiny-model", str(model), "--hidden-size", "512", "--layers", "8",
                        "--heads", "8", "--corpus", str(data)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    if quick:
        return Setup(out=out, model=model, data=data, steps=6, warmup=2, reps=1, quick=True)
    return Setup(out=out, model=model, data=data)


def env_for(threads: int, run_dir: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if run_dir is not None:
        env[RUN_DIR_VAR] = str(run_dir)
    return env


def run_logged(argv: list[str], log: Path, env: dict, timeout: float = 1200) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


def hpcft_run(setup: Setup, name: str, *, nproc: int = 2, threads: int = 1, **train) -> dict:
    """The shared entrypoint under torchrun on this machine; returns its summary plus measured throughput."""
    run_dir = setup.out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    argv = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "hpcft.train", *setup.train_flags(**train)]
    run_logged(argv, run_dir.with_suffix(".log"), env_for(threads, run_dir))
    return read_hpcft(run_dir, setup.warmup)


def hpcft_concurrent(setup: Setup, names: list[str], **train) -> list[dict]:
    """Independent single-rank runs started together: what this machine gives each of N processes
    that share it without talking to each other (the ceiling for N communicating ranks)."""
    procs = []
    for name in names:
        run_dir = setup.out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = [TORCHRUN, "--standalone", "--nproc-per-node=1", "-m", "hpcft.train", *setup.train_flags(**train)]
        log = run_dir.with_suffix(".log").open("w")
        procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env_for(1, run_dir), cwd=ROOT),
                      run_dir, log))
    out = []
    for proc, run_dir, log in procs:
        if proc.wait(timeout=1200) != 0:
            raise RuntimeError(f"concurrent run {run_dir} failed; see {run_dir.with_suffix('.log')}")
        log.close()
        out.append(read_hpcft(run_dir, setup.warmup))
    return out


def read_hpcft(run_dir: Path, warmup: int) -> dict:
    paths = RunPaths(run_dir)
    summary = json.loads(paths.summary.read_text())
    rows = [json.loads(line) for line in paths.metrics.read_text().splitlines() if '"loss"' in line]
    summary["tokens_per_s_steady"] = steady_rate(rows, warmup)
    summary["first_step_time"] = rows[0]["time"] if rows else None
    return summary


def steady_rate(rows: list[dict], warmup: int) -> float:
    """Non-pad tokens (all ranks) per second over the steps after `warmup`, from per-step wall-clock
    stamps and token counts (rows: step, time, tokens in that step)."""
    rows = sorted(rows, key=lambda r: r["step"])
    window = [r for r in rows if r["step"] > warmup]
    start = [r for r in rows if r["step"] == warmup]
    if not window or not start:
        raise RuntimeError(f"too few steps to measure after {warmup} warm-up steps")
    return sum(r["tokens"] for r in window) / (window[-1]["time"] - start[0]["time"])


def hf_run(setup: Setup, name: str, *, precision: str = "fp32") -> dict:
    out = setup.out / "runs" / name
    argv = [TORCHRUN, "--standalone", "--nproc-per-node=2", str(ROOT / "bench" / "hf_trainer.py"), str(setup.model),
            str(setup.data), str(out), str(setup.steps), str(setup.batch), str(setup.context), precision]
    run_logged(argv, out.with_suffix(".log"), env_for(1))
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    # the collator's running count -> tokens per step
    per_step = [dict(r, tokens=r["tokens"] - (rows[i - 1]["tokens"] if i else 0)) for i, r in enumerate(rows)]
    return {"tokens_per_s_steady": steady_rate(per_step, setup.warmup)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
