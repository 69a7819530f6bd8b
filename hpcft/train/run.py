"""setup -> train -> checkpoint/export -> cleanup, for every launcher (torchrun, srun one task per
rank, accelerate launch, plain python)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hpcft.distenv import collect_dist_env
from hpcft.doctor import preflight
from hpcft.paths import RUN_DIR_ENV, RunPaths
from hpcft.train.checkpoint import TrainerState, agree_on_resume, load_checkpoint, save_checkpoint
from hpcft.train.config import TrainConfig
from hpcft.train.data import load_splits, make_eval_loader, make_loader
from hpcft.train.dist import Runtime, barrier, cleanup, print0, setup_distributed
from hpcft.train.flops import model_shape, peak_flops, peak_memory_bytes
from hpcft.train.loop import FlopsModel, evaluate, plan_steps, profiler_context, train
from hpcft.train.metrics import MetricsWriter, ProgressDisplay, plot_metrics
from hpcft.train.model import (apply_activation_checkpointing, apply_lora, block_classes, check_model_dir,
                               check_quantization, count_params, is_seq2seq, load_model, load_tokenizer)
from hpcft.train.parallel import apply_strategy
from hpcft.train.precision import resolve_precision
from hpcft.train.preempt import StopRequest


def choose_run_dir(rt: Runtime) -> Path:
    """HPCFT_RUN_DIR (set by every hpcft launch path), else runs/local/<time> picked by rank 0 and
    shared, so that ranks started by any launcher agree on one directory."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    choice = [str(Path("runs") / "local" / time.strftime("%Y%m%d-%H%M%S"))]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])


def quiet_libraries() -> None:
    """Per-example progress bars from datasets/transformers would drown the per-rank logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def export_model(engine, tokenizer, target: Path, rt: Runtime) -> Path | None:
    """Consolidated HF model (or the PEFT adapter) that from_pretrained / PeftModel loads. Gathered
    from every rank, written by rank 0 into a temporary directory and renamed."""
    state = engine.full_state_dict()
    if rt.is_main:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.hf_model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    barrier(rt)
    return target


def gather_per_rank(rt: Runtime, value: object) -> list:
    if not dist.is_initialized():
        return [value]
    out: list = [None] * rt.env.world_size
    dist.all_gather_object(out, value)
    return out


def run(cfg: TrainConfig) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: a missing local file must fail, not download
    quiet_libraries()
    cfg.validate()
    check_model_dir(cfg)
    check_quantization(cfg)
    dist_env = collect_dist_env()
    stop = StopRequest().install()  # before anything slow: the warning may come during start-up
    rt = setup_distributed(dist_env, timeout_s=cfg.timeout_s)
    paths = RunPaths(choose_run_dir(rt))
    if rt.is_main:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    print(f"hpcft.train: rank {dist_env.rank}/{dist_env.world_size} on {socket.gethostname()} "
          f"(local rank {dist_env.local_rank}, device {rt.device})", flush=True)
    if cfg.preflight:
        print0(rt, preflight(rt, paths.run_dir))
    summary = _session(cfg, rt, paths, stop)
    # _session's frame is gone now, and with it the engine, optimizer and loaders. Destroying the
    # process group while a DeepSpeed/DDP/FSDP object still holds it aborts the process at exit
    # (SIGABRT in about half the runs), which Slurm would report as a failed job.
    cleanup()
    return summary


def _session(cfg: TrainConfig, rt: Runtime, paths: RunPaths, stop: StopRequest) -> dict:
    """Everything that holds the process group: data, model, engine, training, export."""
    dist_env = rt.env
    print0(rt, f"hpcft.train: {dist_env.world_size} rank(s) via {dist_env.launcher}, device {rt.device.type}, "
               f"backend {rt.backend}, strategy {cfg.strategy}, precision {cfg.precision}, run dir {paths.run_dir}")
    torch.manual_seed(cfg.seed)
    seq2seq = is_seq2seq(cfg)
    tokenizer = load_tokenizer(cfg)
    splits = load_splits(cfg, tokenizer, seq2seq=seq2seq)
    loader_args = dict(rank=dist_env.rank, world_size=dist_env.world_size, seed=cfg.seed,
                       pad_id=tokenizer.pad_token_id, num_workers=cfg.num_workers_dataloader)
    train_loader = make_loader(splits.train, batch_size=cfg.batch_size_training, shuffle=True, **loader_args)
    eval_loader = (make_eval_loader(splits.eval, batch_size=cfg.val_batch_size, rank=dist_env.rank,
                                    world_size=dist_env.world_size, pad_id=tokenizer.pad_token_id)
                   if splits.eval is not None and cfg.run_validation else None)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_loader))
    print0(rt, f"hpcft.train: {len(splits.train)} train examples ({splits.form}, {cfg.batching_strategy}), "
               f"{steps_per_epoch} steps per epoch on {dist_env.world_size} rank(s), {total_steps} steps in all")

    precision = resolve_precision(cfg.precision)
    low_cpu = cfg.strategy == "fsdp" and cfg.low_cpu_fsdp and dist_env.distributed
    model = load_model(cfg, seq2seq=seq2seq, dtype=precision.param_dtype, empty=low_cpu and not rt.is_main)
    if cfg.use_peft:
        model = apply_lora(model, cfg, seq2seq=seq2seq)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    n_params, n_trainable = count_params(model)
    full_state = model.state_dict() if low_cpu and rt.is_main else None
    n_layers, hidden = model_shape(model.config)
    engine = apply_strategy(model, cfg=cfg, rt=rt, total_steps=total_steps, blocks=block_classes(model),
                            full_state=full_state)
    del full_state
    print0(rt, f"hpcft.train: {n_params:,} parameters, {n_trainable:,} trainable"
               f"{' (LoRA r=%d)' % cfg.lora_r if cfg.use_peft else ''}")

    resume_from = agree_on_resume(cfg.resume, paths, rt)
    state = load_checkpoint(engine, resume_from, rt) if resume_from else TrainerState()
    if resume_from:
        print0(rt, f"hpcft.train: resumed from {resume_from} at step {state.step}")
    peak, peak_source = peak_flops(cfg.peak_tflops, rt.device, precision.autocast_dtype or precision.param_dtype)
    flops = FlopsModel(n_params, n_layers, hidden, peak)
    metrics = MetricsWriter(paths.metrics, enabled=rt.is_main,
                            tensorboard_dir=paths.run_dir / "tensorboard" if cfg.tensorboard else None)
    summary: dict = {"world_size": dist_env.world_size, "launcher": dist_env.launcher, "strategy": cfg.strategy,
                     "sharding_strategy": cfg.sharding_strategy if cfg.strategy == "fsdp" else None,
                     "precision": cfg.precision, "use_peft": cfg.use_peft, "seq2seq": seq2seq,
                     "parameters": n_params, "trainable_parameters": n_trainable,
                     "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "device": rt.device.type,
                     "backend": rt.backend, "resumed_from": str(resume_from) if resume_from else None,
                     "start_step": state.step, "peak_flops_per_rank": peak, "peak_flops_source": peak_source}
    if eval_loader is not None:
        summary["eval_loss_before"] = evaluate(engine, eval_loader, rt, max_steps=cfg.max_eval_step, seq2seq=seq2seq)
        metrics.write(event="eval", step=state.step, eval_loss=summary["eval_loss_before"])
        print0(rt, f"hpcft.train: eval loss before {summary['eval_loss_before']:.4f}")

    def save(st: TrainerState) -> None:
        path = save_checkpoint(engine, st, paths, rt, keep=cfg.keep_checkpoints)
        print0(rt, f"hpcft.train: checkpoint {path}")

    progress = ProgressDisplay(total_steps, enabled=rt.is_main, start=state.step)
    with profiler_context(cfg.use_profiler, paths.run_dir / "profiler", dist_env.rank) as prof:
        result = train(engine, train_loader, cfg, rt, total_steps=total_steps, state=state, metrics=metrics,
                       progress=progress, flops=flops, save=save, profiler=prof, stop=stop)
    progress.close()
    if result.steps_this_run:
        save(state)
    if result.preempted:
        # Little time is left before Slurm kills the job: no eval or export, just ask for the requeue.
        if rt.is_main:
            paths.requeue_marker.write_text(f"{state.step}\n")
            metrics.write(event="preempted", step=state.step, signal=stop.signal)
            metrics.close()
        print0(rt, f"hpcft.train: stopped at step {state.step} on {stop.signal or 'a peer'}'s warning; "
                   f"checkpoint written, the job will requeue and resume")
        return {"preempted": True, "steps": state.step}
    summary.update(steps=result.steps, steps_this_run=result.steps_this_run, final_train_loss=result.last_loss,
                   train_seconds=round(result.seconds, 3), mfu=result.mfu,
                   tokens_per_s=round(result.tokens / max(result.seconds, 1e-9), 1),
                   finished=result.steps >= total_steps)
    if eval_loader is not None:
        summary["eval_loss_after"] = evaluate(engine, eval_loader, rt, max_steps=cfg.max_eval_step, seq2seq=seq2seq)
        metrics.write(event="eval", step=result.steps, eval_loss=summary["eval_loss_after"])
        print0(rt, f"hpcft.train: eval loss after {summary['eval_loss_after']:.4f}")
    if cfg.save_model:
        summary["model_dir"] = str(export_model(engine, tokenizer, paths.model, rt))
    summary["peak_memory_bytes_per_rank"] = gather_per_rank(rt, peak_memory_bytes(rt.device))
    if rt.is_main:
        metrics.close()
        if cfg.plot:
            plot = plot_metrics(paths.metrics, paths.run_dir / "metrics.png")
            summary["plot"] = str(plot) if plot else None
        summary.update(run_dir=str(paths.run_dir), metrics=str(paths.metrics))
        paths.summary.write_text(json.dumps(summary, indent=1) + "\n")
        print0(rt, "hpcft.train: done " + json.dumps(summary))
    return summary
