"""Resume on a different world size, on the real local cluster, for ddp, fsdp and zero3: a run stopped
on 2 nodes x 2 ranks continues on 1 node x 2 ranks, then on 2 nodes x 1 rank, then on 2 x 2 again
(4 -> 2 -> 2 -> 4 ranks), and every step's loss matches one uninterrupted 2 x 2 run.

Tolerance: relative 2e-5 on each logged loss (written rounded to 6 decimals). Same global batch, same
micro-batch chunks, fp32: the only difference left is the order in which gradients are summed across
ranks and micro-steps (and sharded vs. whole-tensor Adam updates), about 1e-7 relative per step, a few
1e-7 after a dozen Adam steps. A wrong data position, batch or schedule moves the loss by > 1e-2.

The reference is one ddp run: fp32 ddp, fsdp and zero3 compute the same gradients and give the same
losses to 6 decimals (checked when this test was written), so one uninterrupted run serves all three.
"""
import json
from pathlib import Path

import pytest

from hpcft.jobs import wait_for
from tests.integration.helpers import HPCFT, ROOT, run, selected, submitted_job_id, write_spec

pytestmark = pytest.mark.slurm
N_EXAMPLES = 44  # global batch 8: 5 full steps and one of 4 examples (fillers on some ranks) per epoch
TRAIN = {"batch_size_training": 2, "gradient_accumulation_steps": 1, "num_epochs": 2, "max_train_step": 0,
         "lr": 2e-3, "warmup_steps": 2, "run_validation": False, "save_model": False, "plot": False,
         "resume": "latest"}
STAGES = [  # (nodes, ranks per node, steps this run): 4 -> 2 -> 2 -> 4 ranks, across the epoch boundary
    (2, 2, 3), (1, 2, 4), (2, 1, 2), (2, 2, 0)]
REL_TOL = 2e-5


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    lines = (ROOT / "data/samsum_tiny.jsonl").read_text().splitlines()[:N_EXAMPLES]
    path.write_text("\n".join(lines) + "\n")
    return path


def submit_stage(tmp_path, tiny_model, data, name, nodes, ranks, steps_this_run, strategy, after=None):
    """Queues one stage (after the job `after`, if given): (job id, its run directory)."""
    spec = write_spec(tmp_path, tiny_model, filename=f"{name}-{nodes}x{ranks}.yaml", name=name,
                      train={**TRAIN, "data_path": str(data), "strategy": strategy,
                             "max_steps_this_run": steps_this_run},
                      resources={"nodes": nodes, "gpus_per_node": ranks, "cpus_per_task": 1, "time": "00:10:00"},
                      env={"HPCFT_SAMPLE_LOG": "1"})
    proc = run([*HPCFT, "submit", str(spec), *(["--after", after] if after else [])], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = submitted_job_id(proc.stdout)
    return job_id, tmp_path / "runs" / name / job_id


def completed(job_id: str, run_dir: Path) -> Path:
    assert wait_for(job_id, timeout_s=900).state == "COMPLETED", job_id
    return run_dir


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def seen_ids(run_dirs: list[Path]) -> dict[int, list[int]]:
    """epoch -> every example id trained on, over all ranks of all runs."""
    out: dict[int, list[int]] = {}
    for d in run_dirs:
        for f in (d / "sample-ids").glob("rank-*.jsonl"):
            for rec in map(json.loads, f.read_text().splitlines()):
                out.setdefault(rec["epoch"], []).extend(rec["ids"])
    return out


STRATEGIES = ("ddp", "fsdp", "zero3")


@pytest.fixture(scope="module")
def queued(request, cluster, tiny_model, small_data, tmp_path_factory):
    """The uninterrupted reference and every stage of the three moving runs, queued at once: each stage
    waits for the one before it (--after), so the three chains run side by side."""
    ref = submit_stage(tmp_path_factory.mktemp("ref"), tiny_model, small_data, "straight", 2, 2, 0, "ddp")
    chains = {}
    wanted = selected(request).get("test_resume_on_other_world_sizes_matches_an_uninterrupted_run", set())
    for strategy in (s for s in STRATEGIES if s in wanted):
        tmp, after, chains[strategy] = tmp_path_factory.mktemp(f"moving-{strategy}"), None, []
        for nodes, ranks, steps in STAGES:
            job_id, run_dir = submit_stage(tmp, tiny_model, small_data, f"moving-{strategy}", nodes, ranks, steps,
                                           strategy, after=after)
            chains[strategy].append((job_id, run_dir))
            after = job_id
    return ref, chains


@pytest.fixture(scope="module")
def reference(queued):
    run_dir = completed(*queued[0])
    return losses(run_dir), seen_ids([run_dir])


# no `quick` case: each is a chain of four jobs after a reference (~160 s), more than the quick loop can hold
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_on_other_world_sizes_matches_an_uninterrupted_run(queued, reference, strategy):
    ref_losses, ref_ids = reference
    assert sorted(ref_losses) == list(range(1, 13))  # 6 steps per epoch of global batch 8, 2 epochs
    assert {e: sorted(ids) for e, ids in ref_ids.items()} == {0: list(range(N_EXAMPLES)), 1: list(range(N_EXAMPLES))}
    dirs, step = [], 0
    for (nodes, ranks, _), stage in zip(STAGES, queued[1][strategy]):
        d = completed(*stage)
        dirs.append(d)
        got = losses(d)
        assert min(got) == step + 1, (d, sorted(got))  # continued right after the previous stage's last step
        for s, loss in got.items():
            assert abs(loss - ref_losses[s]) <= REL_TOL * abs(ref_losses[s]), (strategy, nodes, ranks, s, loss,
                                                                               ref_losses[s])
        summary = json.loads((d / "summary.json").read_text())
        assert summary["world_size"] == nodes * ranks and summary["global_batch"] == 8
        assert summary["gradient_accumulation_steps"] == 4 // (nodes * ranks)
        if step:
            assert "global batch 8 kept" in (summary["resume_adaptation"] or "") or summary["world_size"] == 2
            restart = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()][0]
            assert restart["event"] == "restart" and restart["step"] == step
            assert restart["world_size"] == nodes * ranks
        step = max(got)
    assert step == 12
    ids = seen_ids(dirs)
    for epoch in (0, 1):  # every example exactly once per epoch over the whole moving run
        assert sorted(ids[epoch]) == list(range(N_EXAMPLES)), epoch
    rank0 = (dirs[1] / "rank-000.log").read_text()
    assert "world 4 -> 2 ranks: gradient accumulation 1 -> 2, global batch 8 kept" in rank0
