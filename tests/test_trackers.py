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


def test_mlflow_file_store_has_the_metrics_and_the_spec(tracked_run):
    from mlflow.tracking import MlflowClient

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


def test_wandb_offline_run_has_the_metrics_and_the_spec(tracked_run):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    run_dir, train, _ = tracked_run
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1  # rank 0 only, offline
    store = DataStore()
    store.open_for_scan(str(files[0]))
    history, config = {}, {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    assert history == {s: r["loss"] for s, r in train.items()}
    assert config["train.lr"] == "0.002" and config["world.world_size"] == "2"


def test_tensorboard_events_have_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, train, _ = tracked_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert got == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
