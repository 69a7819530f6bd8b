"""Experiment trackers (train.report_to) on a 2-rank torchrun: TensorBoard, W&B (offline) and MLflow (a
file store in the run directory) hold the same scalars as metrics.jsonl and the job's spec as
parameters, written by rank 0 only; each is read back with its own library's reader."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracked_run(tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "job" / "4242"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps({"name": "job", "resources": {"nodes": {"min": 1, "max": 1}},
                                                   "train": {"lr": 0.002, "strategy": "ddp"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(HPCFT_RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", SLURM_JOB_NAME="tracked", HOME=str(run_dir.parent))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hpcft.train",
            f"--model_name={tiny_model}", "--max_train_step=6", "--lr=2e-3", "--val_batch_size=16",
            "--report_to=tensorboard,wandb,mlflow"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "loss" in r and "event" not in r}
    evals = [r for r in rows if r.get("event") == "eval"]
    return run_dir, train, evals


def test_mlflow_file_store_has_the_metrics_and_the_spec(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    run_dir, train, evals = tracked_run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1  # rank 0 only
    run = runs[0]
    assert run.info.run_name == "4242" and run.data.params["train.lr"] == "0.002"
    assert run.data.params["world.world_size"] == "2"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert history == {s: r["loss"] for s, r in train.items()}
    ev = client.get_metric_history(run.info.run_id, "eval_eval_loss")
    assert sorted(m.value for m in ev) == sorted(r["eval_loss"] for r in evals)


def wandb_records(path: Path):
    """The records of a .wandb transaction log. wandb 0.31 dropped its Python reader (its Go core
    writes the file), so the framing is read here: LevelDB's log format (32 KiB blocks, records split in
    FULL/FIRST/MIDDLE/LAST pieces behind a 7-byte header) after W&B's 7-byte file header; each record is
    decoded with wandb's own protobuf classes."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the rest of a block too small for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        piece = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            yield pending
            pending = b""


def test_wandb_offline_run_has_the_metrics_and_the_spec(tracked_run):
    from wandb.proto import wandb_internal_pb2

    run_dir, train, _ = tracked_run
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1  # rank 0 only, offline
    history, config = {}, {}
    for data in wandb_records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
        elif kind in ("config", "run"):  # the config arrives with the run record, updates after it
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    assert history == {s: r["loss"] for s, r in train.items()}
    assert config["train.lr"] == "0.002" and config["world.world_size"] == "2"


def test_tensorboard_events_have_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, train, _ = tracked_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert got == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
