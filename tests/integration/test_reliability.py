"""Nothing lost, nothing hung, on the real local cluster: scancel is not mistaken for preemption
(time limits that requeue: test_time_limits.py); a rank killed with SIGKILL ends the whole job fast
and is named; injection stays inert; twenty jobs at once; a kill mid-checkpoint costs nothing saved."""
import hashlib
import json
import os
import signal
import sys
import time

import pytest

from hpcft.jobs import job_info, wait_for
from tests.integration.helpers import (HPCFT, LONG, ROOT, restarts, run, submit_named as submit, submitted_job_id,
                                       wait_for_step, write_spec)

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("backend", ["sbatch", "submitit"])
def test_scancel_is_not_mistaken_for_preemption(cluster, tiny_model, tmp_path, backend):
    job_id, run_dir = submit(tmp_path, tiny_model, "cancelled", train=LONG, launch={"backend": backend})
    wait_for_step(run_dir / "metrics.jsonl", 2)
    assert run([*HPCFT, "cancel", job_id]).returncode == 0
    assert wait_for(job_id, poll_s=0.5, timeout_s=60).state == "CANCELLED"
    time.sleep(12)  # longer than a requeue would take to show (cred_expire=10 on the local cluster)
    assert job_info(job_id).state == "CANCELLED" and restarts(job_id) == 0
    assert not (run_dir / "requeue").exists()


@pytest.mark.quiet  # "fast" is a time bound: measured with the machine to itself
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


def test_hpcft_doctor_in_an_allocation(cluster, tmp_path):
    proc = run(["salloc", "--nodes=2", "--gpus-per-node=2", "--cpus-per-task=2", *HPCFT, "doctor",
                "--output-dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hpcft preflight: ok: 4 rank(s) on 2 node(s) ['node1', 'node2']" in proc.stdout


def test_doctor_stops_nodes_that_formed_separate_worlds(cluster, tmp_path):
    """The classic mistake: torchrun --standalone on each node gives two worlds of one node each."""
    env = dict(os.environ, HPCFT_RUN_DIR=str(tmp_path / "run"))
    proc = run(["salloc", "--nodes=2", "srun", "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run",
                "--standalone", "--nproc-per-node=1", "-m", "hpcft.doctor"], cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "spans 1 host(s)" in proc.stderr and "Slurm allocated 2 node(s): nodes formed separate worlds" in proc.stderr


@pytest.mark.quick
def test_injection_attempts_stay_inert_and_secrets_stay_unwritten(cluster, tiny_model, tmp_path):
    """Values with $(), backticks, ; and newlines reach the job unchanged and run nothing; a secret
    in the submitting environment reaches the job by name and is written nowhere."""
    marker = tmp_path / "pwned"
    nasty = f"a b $(touch {marker}) `touch {marker}`; touch {marker}\nline2 'q' \"dq\""
    secret = "hf_s3cr3t_value_123456"
    digest = hashlib.sha256(secret.encode()).hexdigest()  # the command itself must not hold the secret
    code = ("import os, json, hashlib; print(json.dumps({'value': os.environ['USER_VALUE'], 'token_ok': "
            "hashlib.sha256(os.environ.get('HF_TOKEN', '').encode()).hexdigest() == " + repr(digest) + "}))")
    spec = write_spec(tmp_path, tiny_model, name="it-safe", env={"USER_VALUE": nasty},
                      resources={"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 1, "time": "00:05:00"})
    env = dict(os.environ, HF_TOKEN=secret)
    script = run([*HPCFT, "submit", "--dry-run", str(spec), "--", "-c", code], cwd=tmp_path, env=env).stdout
    proc = run([*HPCFT, "submit", str(spec), "--wait", "--", "-c", code], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    run_dir = tmp_path / "runs" / "it-safe" / job_id
    report = json.loads((run_dir / "rank-001.log").read_text().strip().splitlines()[-1])
    assert report == {"value": nasty, "token_ok": True}
    assert not marker.exists()
    written = [script, proc.stdout, proc.stderr, run([*HPCFT, "logs", job_id, "--output-dir",
                                                      str(tmp_path / "runs")]).stdout]
    written += [p.read_text(errors="replace") for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert not any(secret in text for text in written)


def test_twenty_jobs_at_once_get_distinct_ports_and_no_cross_talk(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="it-load",
                      resources={"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 1, "time": "00:10:00"})
    jobs = []
    for _ in range(20):
        proc = run([*HPCFT, "submit", str(spec), "--", str(ROOT / "examples/my_train.py"), "--steps", "2"],
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        jobs.append(submitted_job_id(proc.stdout))
    ports = set()
    for job_id in jobs:
        assert wait_for(job_id, poll_s=2, timeout_s=900).state == "COMPLETED", job_id
        out = (tmp_path / "runs" / f"slurm-{job_id}.out").read_text()
        ports |= {line.rsplit(":", 1)[1] for line in out.splitlines() if "rendezvous node1:" in line}
        reports = [json.loads((tmp_path / "runs" / "it-load" / job_id / f"rank-{r:03d}.log").read_text()
                              .strip().splitlines()[-1]) for r in range(2)]
        assert [(r["rank"], r["world"], r["rank_sum"]) for r in reports] == [(0, 2, 1.0), (1, 2, 1.0)]
    assert len(ports) == 20


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_killed_mid_checkpoint_resumes_from_the_last_complete_one(cluster, tiny_model, tmp_path, background):
    """Saves from step 20 on stall half-written (fault injection); the job is killed with SIGKILL
    there. The next job of the same name resumes from step 10, the last complete checkpoint. With
    async_checkpoint the stall is in the background writer: training goes on past step 20 meanwhile."""
    train = {**LONG, "save_every": 10, "max_train_step": 40, "async_checkpoint": background}
    job_id, run_dir = submit(tmp_path, tiny_model, "atomic", train=train, launch={"signal_lead_s": 0},
                             env={"HPCFT_FAULT_SAVE_DELAY": "20:120"})
    half = run_dir / "checkpoints" / "step-00000020.tmp"
    start = time.monotonic()
    while not half.exists() and time.monotonic() - start < 300:
        time.sleep(0.2)
    assert half.exists() and (run_dir / "checkpoints" / "step-00000010").is_dir()
    if background:
        wait_for_step(run_dir / "metrics.jsonl", 23, timeout_s=120)  # training did not wait for the save
    time.sleep(1)  # let the ranks get into the half-written state, then kill everything at once
    assert run(["scancel", "--signal=KILL", "--full", job_id]).returncode == 0
    assert wait_for(job_id, poll_s=0.5, timeout_s=120).state in ("CANCELLED", "FAILED")
    assert half.exists() and not (run_dir / "checkpoints" / "step-00000020").exists()
    again, again_dir = submit(tmp_path, tiny_model, "atomic", train={**train, "resume": "latest"},
                              launch={"signal_lead_s": 0})
    assert wait_for(again, timeout_s=300).state == "COMPLETED"
    summary = json.loads((again_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "step-00000010")
    assert summary["start_step"] == 10 and summary["steps"] == 40 and summary["finished"]
