"""Every launch path, on the real local Slurm cluster (no mocks): hpcft submit via sbatch and via
submitit, plain sbatch of slurm/multi_node.slurm, salloc + hpcft launch, and a failing rank."""
import json
import math
import os
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import (HPCFT, ROOT, TRAIN_FLAGS, check_run, job_state, run, submitted_job_id,
                                       write_spec)

pytestmark = pytest.mark.slurm


@pytest.mark.quick
def test_submit_sbatch_2_nodes_x_2(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model)
    proc = run([*HPCFT, "submit", "--nodes", "2", "--gpus-per-node", "2", str(spec), "--wait"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    assert job_state(job_id) == "COMPLETED"
    check_run(tmp_path / "runs" / "it" / job_id, 4)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "it" / job_id / "model").config.model_type == "llama"
    assert (tmp_path / "runs" / f"slurm-{job_id}.out").read_text().count("hpcft.launch: node") == 2
    logs = run([*HPCFT, "logs", job_id, "--output-dir", str(tmp_path / "runs")])
    assert logs.returncode == 0 and "[rank 003]" in logs.stdout and "no failed rank" in logs.stdout


def test_submit_submitit_backend(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="it-submitit")
    proc = run([*HPCFT, "submit", "--backend", "submitit", str(spec), "--wait"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    check_run(tmp_path / "runs" / "it-submitit" / job_id, 4)


def test_sbatch_checked_in_multi_node_script(cluster, tiny_model, tmp_path):
    """Asked for the way many guides ask (a task per rank), the script still starts one launcher per
    node: srun would otherwise read the job's task count back from the environment and start two
    launchers per node. (The per-task GPU request is the salloc case below.)"""
    (tmp_path / "runs").mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("HPCFT_PYTHON", None)
    proc = run(["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2",
                "--cpus-per-task=1", str(ROOT / "slurm/multi_node.slurm"), f"--model_name={tiny_model}",
                f"--data_path={ROOT / 'data/samsum_tiny.jsonl'}", *TRAIN_FLAGS], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    check_run(tmp_path / "runs" / "hpcft" / job_id, 4)
    out = (tmp_path / "runs" / f"slurm-{job_id}.out").read_text()
    assert out.count("hpcft.launch: node") == 2 and out.count("starts 2 CPU ranks") == 2, out[-3000:]


@pytest.mark.parametrize("inside_step", [False, True], ids=["salloc-per-task", "srun-shell"])
def test_salloc_then_hpcft_launch(cluster, tiny_model, tmp_path, inside_step):
    step = ["srun", "--nodes=1", "--ntasks=1"] if inside_step else []
    # salloc asked per task (2 tasks of a GPU each per node), or per node from an srun --pty shell.
    gpus = ["--gpus-per-node=2", "--cpus-per-task=2"] if inside_step else ["--ntasks-per-node=2", "--gpus-per-task=1"]
    proc = run(["salloc", "--nodes=2", *gpus, *step,
                *HPCFT, "launch", "--output-dir", str(tmp_path / "runs"), "--",
                "-m", "hpcft.train", f"--model_name={tiny_model}", f"--data_path={ROOT / 'data/samsum_tiny.jsonl'}",
                *TRAIN_FLAGS], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "interactive").iterdir()
    check_run(run_dir, 4)


def test_submit_2_nodes_x_4_gives_8_ranks(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model)
    proc = run([*HPCFT, "submit", "--nodes", "2", "--gpus-per-node", "4", str(spec), "--wait"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = check_run(tmp_path / "runs" / "it" / submitted_job_id(proc.stdout), 8)
    # 400 examples, 40 held out for eval: 360 / 8 ranks = 45 each, batch 4 -> 12 steps per epoch
    assert summary["steps_per_epoch"] == math.ceil(math.ceil(360 / 8) / 4) == 12


def test_failing_rank_fails_the_job_and_is_named(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="it-fail")
    code = ("import os, sys, time\nr = int(os.environ['RANK'])\nif r == 1:\n    raise ValueError('boom on rank 1')\n"
            "time.sleep(120)")
    proc = run([*HPCFT, "submit", str(spec), "--wait", "--", "-c", code], cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    assert job_state(job_id) == "FAILED"
    logs = run([*HPCFT, "logs", job_id, "--output-dir", str(tmp_path / "runs")])
    assert logs.returncode == 1
    assert "first failure: rank 1 on node1 (exit code 1)" in logs.stderr
    assert "ValueError: boom on rank 1" in logs.stderr


@pytest.mark.parametrize("flags, message", [
    (["--gpus-per-node", "5"], "resources.gpus_per_node: nodes in the default partition have at most 4 GPU(s)"),
    (["--nodes", "3"], "resources.nodes: the default partition has 2 node(s); ask for at most 2"),
    (["--cpus-per-task", "64"], "resources.cpus_per_task: only 0 node(s)"),
    (["--partition", "nosuch"], "resources.partition: Slurm has no partition 'nosuch'"),
    (["--mem", "999G"], "resources.mem: nodes in the default partition have at most 16000 MB"),
])
def test_over_capacity_is_refused_before_submission(cluster, tiny_model, tmp_path, flags, message):
    spec = write_spec(tmp_path, tiny_model)
    proc = run([*HPCFT, "submit", *flags, str(spec)], cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") <= 2
    assert not (tmp_path / "runs").exists()


def test_status_and_cancel(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="it-cancel")
    proc = run([*HPCFT, "submit", str(spec), "--", "-c", "import time; time.sleep(600)"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = submitted_job_id(proc.stdout)
    status = run([*HPCFT, "status", job_id])
    assert status.returncode == 0 and job_id in status.stdout
    assert "RUNNING" in status.stdout or "PENDING" in status.stdout
    assert run([*HPCFT, "cancel", job_id]).returncode == 0
    from hpcft.jobs import wait_for

    assert wait_for(job_id, poll_s=0.5, timeout_s=60).state == "CANCELLED"
    assert "CANCELLED" in run([*HPCFT, "status", job_id]).stdout


def test_srun_one_task_per_rank_runs_the_entrypoint_unchanged(cluster, tiny_model, tmp_path):
    """No torchrun: srun starts every rank; ranks come from SLURM_PROCID / SLURM_LOCALID."""
    run_dir = tmp_path / "srun-run"
    env = dict(os.environ, HPCFT_RUN_DIR=str(run_dir), OMP_NUM_THREADS="1")
    proc = run(["salloc", "--nodes=2", "--ntasks-per-node=2", "srun", "--kill-on-bad-exit=1", sys.executable,
                "-m", "hpcft.train", f"--model_name={tiny_model}", f"--data_path={ROOT / 'data/samsum_tiny.jsonl'}",
                *TRAIN_FLAGS], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["launcher"] == "srun" and summary["world_size"] == 4
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_users_own_script_gets_the_same_rendezvous(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="it-user")
    proc = run([*HPCFT, "submit", str(spec), "--wait", "--", str(ROOT / "examples/my_train.py"), "--steps", "3"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "it-user" / submitted_job_id(proc.stdout)
    reports = [json.loads((run_dir / f"rank-{r:03d}.log").read_text().strip().splitlines()[-1]) for r in range(4)]
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    assert {r["world"] for r in reports} == {4} and {r["rank_sum"] for r in reports} == {6.0}
    assert {r["host"] for r in reports} == {"node1", "node2"}
