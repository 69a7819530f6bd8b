"""A job warned before its time limit checkpoints, requeues itself and resumes with exactly the losses
of an uninterrupted run, under sbatch (USR1 from the batch script) and submitit (its USR2 warning, its
checkpoint() and its requeue). The reference and both limited jobs are submitted together as the
module starts, so the two real 3-minute limits are waited out side by side."""
import json

import pytest

from hpcft.jobs import wait_for
from tests.integration.helpers import LONG, restarts, selected, submit_named, train_losses

# background: the jobs mostly wait out their limits, so envs/test.sh runs them beside the unit tests. Each
# attempt has 120 s before its warning: enough for start-up on a busy machine (under a 4x load start-up
# took ~60 s; a start that misses it is requeued again and only costs time).
pytestmark = [pytest.mark.slurm, pytest.mark.background]
LIMITED = {"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 2, "time": "3"}
# Rank 0 sleeps 0.5 s in every step: 270 steps (135 s) then outlast the 120 s a 3-minute job has before
# its 60 s warning on any machine, however fast or idle (losses are unchanged by the sleep).
SLOW = {"HPCFT_FAULT_SLOW": "0:0.5"}
BACKENDS = {"sbatch": ("preempted", "SIGUSR1", {"signal_lead_s": 60}),
            "submitit": ("preempted-submitit", "SIGUSR2", {"signal_lead_s": 60, "backend": "submitit"})}


@pytest.fixture(scope="module")
def jobs(request, cluster, tiny_model, tmp_path_factory):
    """The uninterrupted reference, then one time-limited job per backend, all in the queue at once."""
    wanted = selected(request)["test_time_limit_warning_checkpoints_requeues_and_resumes_exactly"]
    ref = submit_named(tmp_path_factory.mktemp("reference"), tiny_model, "reference", train=LONG,
                       launch={"signal_lead_s": 0})
    limited = {backend: submit_named(tmp_path_factory.mktemp(backend), tiny_model, name, train=LONG,
                                     resources=LIMITED, launch=launch, env=SLOW)
               for backend, (name, _, launch) in BACKENDS.items() if backend in wanted}
    return ref, limited


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_time_limit_warning_checkpoints_requeues_and_resumes_exactly(jobs, backend):
    (ref_id, ref_dir), limited = jobs
    job_id, run_dir = limited[backend]
    assert wait_for(ref_id, timeout_s=900).state == "COMPLETED"
    assert wait_for(job_id, timeout_s=900).state == "COMPLETED"
    assert restarts(job_id) >= 1  # interrupted at least once, then requeued (by its batch script / by submitit)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 271))  # contiguous: none lost, none repeated
    assert any(r.get("event") == "preempted" and r.get("signal") == BACKENDS[backend][1] for r in records)
    straight = train_losses(ref_dir / "metrics.jsonl")
    resumed = train_losses(run_dir / "metrics.jsonl")
    assert max(abs(straight[s] - resumed[s]) for s in straight) < 1e-5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"]
    if backend == "submitit":
        assert not (run_dir / "requeue").exists()
