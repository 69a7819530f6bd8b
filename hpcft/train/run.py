"""setup -> train -> save -> cleanup, for every launcher (torchrun, srun per rank, plain python)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from hpcft.distenv import collect_dist_env
from hpcft.errors import SpecError
from hpcft.paths import RUN_DIR_ENV, RunPaths
from hpcft.train.config import TrainConfig
from hpcft.train.data import load_splits, make_loader
from hpcft.train.dist import barrier, cleanup, print0, setup_distributed
from hpcft.train.loop import evaluate, plan_steps, train
from hpcft.train.metrics import MetricsWriter, ProgressDisplay
from hpcft.train.parallel import apply_strategy, unwrap


def default_run_dir() -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "local" / run_id


def quiet_libraries() -> None:
    """Per-example progress bars from datasets/transformers would drown the per-rank logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def load_model_and_tokenizer(cfg: TrainConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(cfg.model_name) / "config.json").is_file():
        raise SpecError("train.model_name", f"no model directory with config.json at {cfg.model_name!r}; "
                                            f"build one with: hpcft make-tiny-model {cfg.model_name}")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name or cfg.model_name, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name, local_files_only=True, dtype=torch.float32)
    return model, tokenizer


def save_final(model, tokenizer, target: Path) -> None:
    """Write to a temporary directory, then rename: a crash never leaves a half-saved model."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def run(cfg: TrainConfig) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: a missing local file must fail, not download
    quiet_libraries()
    cfg.validate()
    dist_env = collect_dist_env()
    paths = RunPaths(Path(os.environ.get(RUN_DIR_ENV) or default_run_dir()))
    rt = setup_distributed(dist_env, timeout_s=cfg.timeout_s)
    if rt.is_main:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    print(f"hpcft.train: rank {dist_env.rank}/{dist_env.world_size} on {socket.gethostname()} "
          f"(local rank {dist_env.local_rank}, device {rt.device})", flush=True)
    print0(rt, f"hpcft.train: {dist_env.world_size} rank(s) via {dist_env.launcher}, device {rt.device.type}, "
               f"backend {rt.backend}, strategy {cfg.strategy}, run dir {paths.run_dir}")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg)
    splits = load_splits(cfg, tokenizer)
    loader_args = dict(rank=dist_env.rank, world_size=dist_env.world_size, seed=cfg.seed,
                       pad_id=tokenizer.pad_token_id, num_workers=cfg.num_workers_dataloader)
    train_loader = make_loader(splits.train, batch_size=cfg.batch_size_training, shuffle=True, **loader_args)
    eval_loader = (make_loader(splits.eval, batch_size=cfg.val_batch_size, shuffle=False, **loader_args)
                   if splits.eval is not None and cfg.run_validation else None)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_loader))
    print0(rt, f"hpcft.train: {len(splits.train)} train examples ({splits.form}), {steps_per_epoch} steps per epoch "
               f"on {dist_env.world_size} rank(s), {total_steps} steps in all")
    model = apply_strategy(model, strategy=cfg.strategy, rt=rt)
    metrics = MetricsWriter(paths.metrics, enabled=rt.is_main)
    summary: dict = {"world_size": dist_env.world_size, "steps_per_epoch": steps_per_epoch,
                     "total_steps": total_steps, "device": rt.device.type, "backend": rt.backend}
    if eval_loader is not None:
        summary["eval_loss_before"] = evaluate(model, eval_loader, rt, cfg.max_eval_step)
        metrics.write(event="eval", step=0, eval_loss=summary["eval_loss_before"])
        print0(rt, f"hpcft.train: eval loss before {summary['eval_loss_before']:.4f}")
    progress = ProgressDisplay(total_steps, enabled=rt.is_main)
    result = train(model, train_loader, cfg, rt, total_steps=total_steps, metrics=metrics, progress=progress)
    progress.close()
    summary.update(steps=result.steps, final_train_loss=result.last_loss, train_seconds=round(result.seconds, 3),
                   tokens_per_s=round(result.tokens / max(result.seconds, 1e-9), 1))
    if eval_loader is not None:
        summary["eval_loss_after"] = evaluate(model, eval_loader, rt, cfg.max_eval_step)
        metrics.write(event="eval", step=result.steps, eval_loss=summary["eval_loss_after"])
        print0(rt, f"hpcft.train: eval loss after {summary['eval_loss_after']:.4f}")
    if cfg.save_model and rt.is_main:
        save_final(model, tokenizer, paths.model)
        summary["model_dir"] = str(paths.model)
    barrier(rt)
    if rt.is_main:
        summary.update(run_dir=str(paths.run_dir), metrics=str(paths.metrics))
        paths.summary.write_text(json.dumps(summary, indent=1) + "\n")
        print0(rt, "hpcft.train: done " + json.dumps(summary))
    metrics.close()
    cleanup(model, train_loader, eval_loader)
    return summary
