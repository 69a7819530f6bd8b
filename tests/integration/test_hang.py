"""Hang triage and stragglers on the real local cluster, 2 nodes x 2 ranks, two jobs submitted together:
one rank stopped with SIGSTOP (while another is slowed by fault injection: the straggler), and one
rank asleep inside a step (fault injection). Each job ends within 2 x hang_timeout_s of the hang, and
`hpcft logs` names the stuck rank, not rank 0."""
import json
import os
import signal
import time

import pytest

from hpcft.jobs import wait_for
from tests.integration.helpers import HPCFT, run, submitted_job_id, wait_for_step, write_spec

# its bounds are wall time (the job ends within 2 x HANG): run with the machine to itself (envs/test.sh)
pytestmark = [pytest.mark.slurm, pytest.mark.quiet]
HANG = 20  # hang_timeout_s of both jobs; timeout_s (collectives) is well above 2 x HANG
TRAIN = {"num_epochs": 6, "max_train_step": 0, "lr": 1e-3, "hang_timeout_s": HANG, "timeout_s": 150,
         "run_validation": False, "save_model": False}
RESOURCES = {"nodes": 2, "gpus_per_node": 2, "cpus_per_task": 2, "time": "00:10:00"}


def submit(tmp_path, tiny_model, name, env):
    spec = write_spec(tmp_path, tiny_model, filename=f"{name}.yaml", name=name, train=TRAIN, resources=RESOURCES,
                      env=env)
    proc = run([*HPCFT, "submit", str(spec)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    return job_id, tmp_path / "runs" / name / job_id


def hpcft_logs(job_id, tmp_path, *flags):
    return run([*HPCFT, "logs", job_id, "--output-dir", str(tmp_path / "runs"), *flags])


@pytest.fixture(scope="module")
def jobs(cluster, tiny_model, tmp_path_factory):
    """Both jobs at once: rank 2 slowed by 0.5 s per step (then rank 3 stopped), and rank 1 asleep in step 6."""
    tmp = tmp_path_factory.mktemp("hang")
    stopped = submit(tmp, tiny_model, "stopped", {"HPCFT_FAULT_SLOW": "2:0.5"})
    asleep = submit(tmp, tiny_model, "asleep", {"HPCFT_FAULT_HANG": "1:6:600"})
    return tmp, stopped, asleep


def test_sigstopped_rank_ends_the_job_and_is_named_and_a_slow_rank_is_a_straggler(jobs):
    tmp, (job_id, run_dir), _ = jobs
    wait_for_step(run_dir / "metrics.jsonl", 12)  # straggler check at step 10
    rank0 = (run_dir / "rank-000.log").read_text()
    assert "hpcft.train: straggler at step 10: rank 2 (" in rank0, rank0[-3000:]
    victim = int((run_dir / "rank-003.pid").read_text())
    stopped_at = time.monotonic()
    os.kill(victim, signal.SIGSTOP)  # the nodes share this machine, so the rank's pid is ours to stop
    info = wait_for(job_id, poll_s=0.5, timeout_s=4 * HANG)
    assert info.state == "FAILED"
    assert time.monotonic() - stopped_at < 2 * HANG
    exit3 = json.loads((run_dir / "rank-003.exit.json").read_text())
    # Killed by its wrapper (SIGKILL), or continued and terminated by Slurm's own step teardown
    # (SIGCONT, SIGTERM) when that comes first; either way the wrapper saw it stopped.
    assert exit3["stopped"] and exit3["signal"] in ("SIGKILL", "SIGTERM"), exit3
    logs = hpcft_logs(job_id, tmp, "--failure-only")
    assert logs.returncode == 1
    assert "first failure: rank 3 on node2 (hung: stopped (SIGSTOP, state T); last completed step" in logs.stderr, \
        logs.stderr
    stats = hpcft_logs(job_id, tmp, "--stats")
    assert stats.returncode == 0 and "stragglers (busy median > 1.2x the world's): rank 2" in stats.stdout, stats.stdout
    print(logs.stderr, stats.stdout, sep="\n")


def test_rank_asleep_in_a_step_ends_the_job_with_its_stack_and_is_named(jobs):
    tmp, _, (job_id, run_dir) = jobs
    info = wait_for(job_id, poll_s=0.5, timeout_s=300)
    assert info.state == "FAILED"
    beat = json.loads((run_dir / "rank-001.heartbeat.json").read_text())
    ended = max(json.loads(p.read_text())["ended"] for p in run_dir.glob("rank-*.exit.json"))
    assert ended - beat["progress"] < 2 * HANG  # from the rank's last progress to the last rank's exit
    logs = hpcft_logs(job_id, tmp, "--failure-only")
    assert logs.returncode == 1
    assert "first failure: rank 1 on node1 (hung: no progress; last completed step 5, phase forward)" in logs.stderr, \
        logs.stderr
    assert "in inject" in logs.stderr and "in train" in logs.stderr  # the top of its stack: asleep in the fault
    # Its every thread is dumped in its own log: by its own watchdog, or, when a bystander's watchdog
    # fired a moment earlier (all ranks stop progressing within ~0.1 s of each other), by the launcher's
    # SIGTERM, which makes faulthandler dump them too.
    rank1 = (run_dir / "rank-001.log").read_text()
    assert "in inject" in rank1 and "in train" in rank1, rank1[-3000:]
    print(logs.stderr)
