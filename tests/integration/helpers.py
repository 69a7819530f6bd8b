"""Shared by the integration tests: job specs in a temp dir, hpcft as users run it, run checks."""
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HPCFT = [sys.executable, "-m", "hpcft.cli"]
TRAIN_FLAGS = ["--max_train_step=8", "--lr=2e-3", "--warmup_steps=2", "--val_batch_size=16"]


def write_spec(tmp_path: Path, tiny_model, filename: str = "spec.yaml", train: dict | None = None, **over) -> Path:
    spec = {
        "name": "it",
        "output_dir": str(tmp_path / "runs"),
        "resources": {"nodes": 2, "gpus_per_node": 2, "cpus_per_task": 2, "time": "00:10:00"},
        "train": {"model_name": str(tiny_model), "data_path": str(ROOT / "data/samsum_tiny.jsonl"),
                  "max_train_step": 8, "lr": 2e-3, "warmup_steps": 2, "val_batch_size": 16, "plot": False,
                  **(train or {})},
    }
    spec.update(over)
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(spec))
    return path


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)


def job_state(job_id: str) -> str:
    out = run(["scontrol", "-o", "show", "job", job_id]).stdout
    return next(w.split("=", 1)[1] for w in out.split() if w.startswith("JobState="))


def submitted_job_id(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.strip().startswith("job "))


def check_run(run_dir: Path, ranks: int, hosts=("node1", "node2")) -> dict:
    """One log per rank, every rank exited 0 on the expected hosts, eval loss went down, model reloads."""
    logs = sorted(run_dir.glob("rank-*.log"))
    assert [p.name for p in logs] == [f"rank-{r:03d}.log" for r in range(ranks)]
    exits = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank-*.exit.json"))]
    assert [e["returncode"] for e in exits] == [0] * ranks
    assert {e["host"] for e in exits} == set(hosts)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == ranks
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (run_dir / "model").is_dir()
    return summary


def train_losses(metrics: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends to the same file, so later lines win."""
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}


def wait_for_step(metrics, step: int, timeout_s: float = 300) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if metrics.exists() and any(r >= step for r in train_losses(metrics)):
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} in {metrics} after {timeout_s} s")


LONG = {"num_epochs": 6, "max_train_step": 0, "lr": 1e-3, "save_every": 100}  # 270 steps of 2 x 1 ranks


def submit_named(tmp_path, tiny_model, name, *, train, resources=None, launch=None, env=None):
    """`hpcft submit` of a spec named `name`: (job id, its run directory)."""
    extra = {**({"launch": launch} if launch else {}), **({"env": env} if env else {})}
    spec = write_spec(tmp_path, tiny_model, filename=f"{name}.yaml", name=name, train=train,
                      resources=resources or {"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 2, "time": "00:10:00"},
                      **extra)
    proc = run([*HPCFT, "submit", str(spec)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    return job_id, tmp_path / "runs" / name / job_id


def restarts(job_id: str) -> int:
    out = run(["scontrol", "-o", "show", "job", job_id]).stdout
    return int(next(w.split("=", 1)[1] for w in out.split() if w.startswith("Restarts=")))


def selected(request) -> dict[str, set]:
    """This module's tests that the session runs (after -m/-k): test name -> the values of its `name`,
    `strategy` or `backend` parameter (None when unparametrised). Module fixtures submit just those jobs,
    so a quick or -k run does not wait for a whole matrix."""
    out: dict[str, set] = {}
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            params = getattr(getattr(item, "callspec", None), "params", {})
            value = next((params[k] for k in ("name", "strategy", "backend") if k in params), None)
            out.setdefault(item.originalname, set()).add(value)
    return out
