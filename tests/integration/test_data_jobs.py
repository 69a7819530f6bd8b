"""Data on the cluster: `hpcft submit --prepare` tokenizes once in its own CPU job and the training job
(afterok) starts on a cache hit; a second job on the same data hits the cache too, and a packed and a
padded run of it agree on the eval loss; a job on changed inputs tokenizes once for all its ranks; a
preparation that fails cancels its training job instead of leaving it queued forever. Chat data
(loss on assistant turns, the tiny model's chat template) runs end to end."""
import json

import pytest

from hpcft.jobs import wait_for
from tests.integration.helpers import HPCFT, ROOT, run, submitted_job_id, write_spec

pytestmark = pytest.mark.slurm
TOKENIZING = "hpcft.prepare: tokenizing"


def chat_spec(tmp_path, tiny_model, name, nodes=2, gpus=2, **train):
    return write_spec(tmp_path, tiny_model, filename=f"{name}.yaml", name=name,
                      resources={"nodes": nodes, "gpus_per_node": gpus, "cpus_per_task": 2, "time": "00:10:00"},
                      prepare={"cpus_per_task": 2},
                      train={"data_path": str(ROOT / "data/chat_tiny.jsonl"), "batching_strategy": "packing",
                             "context_length": 256, "max_train_step": 6, "save_model": False, **train})


def submit(tmp_path, spec, *flags) -> tuple[str, str | None]:
    proc = run([*HPCFT, "submit", *flags, str(spec)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prep = next((line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("prepare ")), None)
    return submitted_job_id(proc.stdout), prep


def rank_logs(tmp_path, name, job_id) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "runs" / name / job_id).glob("rank-*.log")))


def summary(tmp_path, name, job_id) -> dict:
    return json.loads((tmp_path / "runs" / name / job_id / "summary.json").read_text())


def test_prepare_job_then_cache_hits_and_one_tokenization_per_job(cluster, tiny_model, tmp_path):
    packed, prep = submit(tmp_path, chat_spec(tmp_path, tiny_model, "packed"), "--prepare")
    assert prep is not None
    assert wait_for(prep, poll_s=1, timeout_s=300).state == "COMPLETED"
    prep_out = (tmp_path / "runs" / f"slurm-{prep}.out").read_text()
    assert prep_out.count(TOKENIZING) == 1 and "form chat" in prep_out
    # With the cache filled: the same data padded (a hit), and a changed context length (a miss).
    padded, _ = submit(tmp_path, chat_spec(tmp_path, tiny_model, "padded", gpus=1, batching_strategy="padding"))
    # dataset_num_proc asks for workers: rank 0 hands tokenizing to a child process (large data does too)
    changed, _ = submit(tmp_path, chat_spec(tmp_path, tiny_model, "changed", context_length=192, dataset_num_proc=2))
    for name, job in (("packed", packed), ("padded", padded), ("changed", changed)):
        info = wait_for(job, poll_s=2, timeout_s=600)
        assert info.state == "COMPLETED", (name, info, rank_logs(tmp_path, name, job)[-3000:])
    for name, job in (("packed", packed), ("padded", padded)):
        logs = rank_logs(tmp_path, name, job)
        assert TOKENIZING not in logs and "tokenized data from the cache" in logs, name
    logs = rank_logs(tmp_path, "changed", changed)
    assert logs.count(TOKENIZING) == 1 and "form chat" in logs  # rank 0's child, for all 4 ranks
    assert "hpcft.prepare: ready" in logs  # the child's last line
    # isolated packing computes what padding computes: the same eval loss of the same starting model
    a, b = summary(tmp_path, "packed", packed), summary(tmp_path, "padded", padded)
    assert a["world_size"] == 4 and b["world_size"] == 2
    assert a["eval_loss_before"] == pytest.approx(b["eval_loss_before"], rel=1e-5)
    assert a["eval_loss_after"] < a["eval_loss_before"]
    entries = [p for p in (tmp_path / "runs" / "data-cache").iterdir() if p.name != "fingerprints"]
    assert len(entries) == 2  # context 256 and 192: one entry each, nothing half-written left


@pytest.mark.quick
def test_a_failed_preparation_cancels_its_training_job(cluster, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "what form is this?"}\n')
    job, prep = submit(tmp_path, chat_spec(tmp_path, tiny_model, "bad", data_path=str(bad)), "--prepare", "--no-check")
    assert wait_for(prep, poll_s=1, timeout_s=300).state == "FAILED"
    assert wait_for(job, poll_s=1, timeout_s=120).state == "CANCELLED"
    assert "train.data_path: cannot tell the data form" in (tmp_path / "runs" / f"slurm-{prep}.out").read_text()
    run_dir = tmp_path / "runs" / "bad" / job  # holds the spec hpcft submit wrote, nothing a rank wrote
    assert [p.name for p in run_dir.iterdir()] == ["spec.json"]  # it never started
