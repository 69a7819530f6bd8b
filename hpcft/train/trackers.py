"""Experiment trackers on rank 0 (train.report_to): TensorBoard, Weights & Biases and MLflow receive the
same scalars as metrics.jsonl, at the same steps, and the job's spec as parameters.

- tensorboard: event files in <run>/tensorboard/.
- wandb: offline unless WANDB_MODE says otherwise (compute nodes rarely reach the internet): the run is
  written to <run>/wandb/offline-run-*; `wandb sync <run>/wandb/offline-run-*` uploads it later.
- mlflow: MLFLOW_TRACKING_URI when set, else a local file store in <run>/mlruns
  (`mlflow ui --backend-store-uri <run>/mlruns` to browse it).
"""
from __future__ import annotations

import os
from pathlib import Path

def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"}: tracker parameters are flat strings."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = str(value)
    return out


class Trackers:
    """The trackers one run reports to; every method is a no-op for an empty list."""

    def __init__(self, names: list[str], *, run_dir: Path, project: str, run_name: str, params: dict):
        self.names = list(names)
        self._tb = self._wandb = self._mlflow = None
        flat = flatten(params)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in self.names:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            # id = the run directory's name: a requeued attempt of the job continues the same run
            self._wandb = wandb.init(project=project, name=run_name, id=run_name, resume="allow", dir=str(run_dir),
                                     config=flat, settings=wandb.Settings(console="off", x_disable_stats=True))
        if "mlflow" in self.names:
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked: a file store
                # in the run directory needs no server and no database driver on a compute node.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (run_dir / "mlruns").resolve().as_uri()
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(project)
            self._mlflow = mlflow
            # a requeued attempt of the job continues its run (tagged with the run directory's name)
            earlier = mlflow.search_runs(filter_string=f"tags.hpcft_run = '{run_name}'", output_format="list")
            if earlier:
                mlflow.start_run(run_id=earlier[0].info.run_id)
            else:
                mlflow.start_run(run_name=run_name, tags={"hpcft_run": run_name})
                # MLflow caps a parameter value's length; long ones (a chat template) are cut, not refused
                mlflow.log_params({k: v[:6000] for k, v in flat.items()})

    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(prefix + key, value, step)
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in scalars.items()}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({(prefix + k).replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()
