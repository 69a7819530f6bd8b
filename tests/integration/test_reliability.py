"""Nothing lost, nothing hung, on the real local cluster: a job warned before its time limit
checkpoints, requeues itself and resumes with exactly the losses of an uninterrupted run; scancel
is not mistaken for that; a rank killed with SIGKILL ends the whole job fast and is named."""
import json
import os
import signal
import time

import pytest

from hpcft.jobs import job_info, wait_for
from tests.integration.helpers import HPCFT, run, submitted_job_id, train_losses, write_spec

pytestmark = pytest.mark.slurm
LONG = {"num_epochs": 6, "max_train_step": 0, "lr": 1e-3, "save_every": 100}


def submit(tmp_path, tiny_model, name, *, train, resources=None, launch=None):
    spec = write_spec(tmp_path, tiny_model, filename=f"{name}.yaml", name=name, train=train,
                      resources=resources or {"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 2, "time": "00:10:00"},
                      **({"launch": launch} if launch else {}))
    proc = run([*HPCFT, "submit", str(spec)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    return job_id, tmp_path / "runs" / name / job_id


def restarts(job_id: str) -> int:
    out = run(["scontrol", "-o", "show", "job", job_id]).stdout
    return int(next(w.split("=", 1)[1] for w in out.split() if w.startswith("Restarts=")))


def wait_for_step(metrics, step: int, timeout_s: float = 300) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if metrics.exists() and any(r >= step for r in train_losses(metrics)):
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} in {metrics} after {timeout_s} s")


def test_time_limit_warning_checkpoints_requeues_and_resumes_exactly(cluster, tiny_model, tmp_path):
    # 270 steps take longer than what a 2-minute job has left after start-up and the 50 s warning.
    ref_id, ref_dir = submit(tmp_path, tiny_model, "reference", train=LONG, launch={"signal_lead_s": 0})
    job_id, run_dir = submit(tmp_path, tiny_model, "preempted", train=LONG,
                             resources={"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 2, "time": "2"},
                             launch={"signal_lead_s": 50})
    assert wait_for(ref_id, timeout_s=600).state == "COMPLETED"
    assert wait_for(job_id, timeout_s=900).state == "COMPLETED"
    assert restarts(job_id) >= 1  # interrupted at least once, then requeued by its own batch script
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 271))  # contiguous: none lost, none repeated
    assert any(r.get("event") == "preempted" and r.get("signal") == "SIGUSR1" for r in records)
    straight = train_losses(ref_dir / "metrics.jsonl")
    resumed = train_losses(run_dir / "metrics.jsonl")
    assert max(abs(straight[s] - resumed[s]) for s in straight) < 1e-5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"]


def test_scancel_is_not_mistaken_for_preemption(cluster, tiny_model, tmp_path):
    job_id, run_dir = submit(tmp_path, tiny_model, "cancelled", train=LONG)
    wait_for_step(run_dir / "metrics.jsonl", 2)
    assert run([*HPCFT, "cancel", job_id]).returncode == 0
    assert wait_for(job_id, poll_s=0.5, timeout_s=60).state == "CANCELLED"
    time.sleep(12)  # longer than a requeue would take to show (cred_expire=10 on the local cluster)
    assert job_info(job_id).state == "CANCELLED" and restarts(job_id) == 0
    assert not (run_dir / "requeue").exists()


def test_sigkill_of_one_rank_ends_the_job_fast_and_logs_name_it(cluster, tiny_model, tmp_path):
    job_id, run_dir = submit(tmp_path, tiny_model, "killed", train=LONG,
                             resources={"nodes": 2, "gpus_per_node": 2, "cpus_per_task": 2, "time": "00:10:00"})
    wait_for_step(run_dir / "metrics.jsonl", 3)
    victim = int((run_dir / "rank-002.pid").read_text())
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)  # the nodes share this machine, so the rank's pid is ours to kill
    info = wait_for(job_id, poll_s=0.5, timeout_s=120)
    assert info.state == "FAILED"
    assert time.monotonic() - killed_at < 60
    logs = run([*HPCFT, "logs", job_id, "--output-dir", str(tmp_path / "runs"), "--failure-only"])
    assert logs.returncode == 1
    assert "first failure: rank 2 on node2 (signal SIGKILL)" in logs.stderr
