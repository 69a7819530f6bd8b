"""`envs/local-cluster.sh down` with a job running leaves nothing of the job behind: not the batch
shell, not srun, the node launchers, torchrun or the ranks (they used to run on, burning CPU, with
no slurmd left to stop them). Runs last: it stops the cluster every other test shares, then starts
it again."""
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.helpers import HPCFT, ROOT, run, submitted_job_id, write_spec

pytestmark = [pytest.mark.slurm, pytest.mark.cluster_restart]
CLUSTER = ["bash", str(ROOT / "envs/local-cluster.sh")]


def job_processes(job_id: str) -> list[str]:
    """pid and command of every process whose environment names this job."""
    needle = f"SLURM_JOB_ID={job_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name} {cmdline}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_down_cancels_jobs_and_leaves_no_process_behind(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="it-down",
                      resources={"nodes": 2, "gpus_per_node": 2, "cpus_per_task": 2, "time": "00:30:00"})
    proc = run([*HPCFT, "submit", str(spec), "--", "-c", "import time; print('rank up', flush=True); time.sleep(900)"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = submitted_job_id(proc.stdout)
    run_dir = tmp_path / "runs" / "it-down" / job_id
    start = time.monotonic()
    while len(list(run_dir.glob("rank-*.pid"))) < 4 and time.monotonic() - start < 120:
        time.sleep(0.5)
    assert len(list(run_dir.glob("rank-*.pid"))) == 4, "the job's four ranks did not start"
    before = job_processes(job_id)
    assert any("hpcft.launch" in p for p in before) and any("torch.distributed.run" in p for p in before)
    try:
        down = subprocess.run(CLUSTER + ["down"], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        time.sleep(1)
        assert job_processes(job_id) == []
        assert subprocess.run(["pgrep", "-x", "slurmd|slurmctld|slurmstepd"]).returncode == 1
    finally:
        subprocess.run(CLUSTER + ["up", "--nodes", "2"], check=True, timeout=120)
    # The cluster came back for whatever runs after this test, and takes jobs again.
    again = run(["srun", "--nodes=2", "hostname"])
    assert again.returncode == 0 and sorted(again.stdout.split()) == ["node1", "node2"], again.stderr
