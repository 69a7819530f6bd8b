"""Elastic node ranges on a 3-node local cluster: a job asking `nodes: 2-3` runs on 3; one node is
lost for good mid-run (its slurmd and every process on it killed, as a power loss would); Slurm
requeues the job, it restarts on the 2 nodes that remain, resumes from its last checkpoint with the
global batch kept (3 -> 2 ranks) and completes. Runs last: it rebuilds the cluster with 3 nodes and
puts the shared 2-node cluster back afterwards."""
import json
import subprocess
import time

import pytest

from hpcft.jobs import job_info, wait_for
from tests.integration.helpers import HPCFT, ROOT, run, submitted_job_id, write_spec

pytestmark = [pytest.mark.slurm, pytest.mark.cluster_restart]
CLUSTER = ["bash", str(ROOT / "envs/local-cluster.sh")]


@pytest.fixture
def three_nodes(cluster):
    subprocess.run(CLUSTER + ["up", "--nodes", "3"], check=True, timeout=180)
    try:
        yield
    finally:
        subprocess.run(CLUSTER + ["up", "--nodes", "2"], check=True, timeout=180)


def test_job_loses_a_node_for_good_and_finishes_on_the_rest(three_nodes, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="elastic",
                      resources={"nodes": "2-3", "gpus_per_node": 1, "cpus_per_task": 1, "time": "00:15:00"},
                      train={"strategy": "fsdp", "batch_size_training": 2, "gradient_accumulation_steps": 2,
                             "max_train_step": 0, "num_epochs": 1, "save_every": 3, "lr": 1e-3,
                             "run_validation": False, "save_model": False},
                      # Rank 2 (node3, gone after the restart) slows every step of the 3-node attempt, so that
                      # node3 is killed between two checkpoints, not just after one (CI once saw 8 -> 9 saved).
                      env={"HPCFT_FAULT_SLOW": "2:2.5"})
    proc = run([*HPCFT, "submit", str(spec)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#SBATCH --nodes=2-3" in run([*HPCFT, "submit", "--dry-run", str(spec)], cwd=tmp_path).stdout
    job_id = submitted_job_id(proc.stdout)
    run_dir = tmp_path / "runs" / "elastic" / job_id
    metrics = run_dir / "metrics.jsonl"
    start = time.monotonic()
    while time.monotonic() - start < 300:  # a checkpoint on 3 nodes, then one step past it, not two
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 7 and max(steps) % 3 == 1:
            break
        time.sleep(0.2)
    assert job_info(job_id).nodes == "3"
    killed = subprocess.run(CLUSTER + ["kill-node", "node3"], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 0, killed.stderr
    info = wait_for(job_id, poll_s=2, timeout_s=600)
    assert info.state == "COMPLETED", info

    status = run([*HPCFT, "status", job_id], env={**__import__("os").environ, "COLUMNS": "200"})
    assert "node[1-2]" in status.stdout and "COMPLETED" in status.stdout, status.stdout
    assert int(job_info(job_id).restarts) >= 1, status.stdout

    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    restarts = [r for r in rows if r.get("event") == "restart"]
    assert restarts and restarts[-1]["world_size"] == 2 and restarts[-1]["step"] % 3 == 0
    assert "world 3 -> 2 ranks: gradient accumulation 2 -> 3, global batch 12 kept" in restarts[-1]["adaptation"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["world_size"] == 2 and summary["global_batch"] == 12
    from hpcft.train.metrics import effective_rows

    steps = [r["step"] for r in effective_rows(rows) if "loss" in r and "event" not in r]
    assert steps == list(range(1, summary["total_steps"] + 1))  # each step once, the repeated ones dropped
    logged = [r["step"] for r in rows if "loss" in r and "event" not in r]
    assert len(logged) > len(steps)  # steps past the checkpoint were lost with node3 and trained again
