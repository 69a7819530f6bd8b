"""The training loop: micro-batches, accumulation boundaries, exact mid-epoch resume, periodic
checkpoints, metrics (loss, lr, grad norm, tokens/s, useful tokens/s, MFU). The strategy lives in
the Engine; this loop does not branch on it."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hpcft.train.checkpoint import TrainerState
from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime, all_reduce_max, all_reduce_sum
from hpcft.train.metrics import MetricsWriter, ProgressDisplay
from hpcft.train.watchdog import Progress


def to_device(batch: dict, device: torch.device) -> dict:
    """The model's inputs on the device (the collate's num_tokens is not one). No KV cache: a cache
    would also turn off the packed-sequence mask the model builds from position_ids."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "num_tokens"}
    return {**inputs, "use_cache": False}


def predicted_tokens(labels: torch.Tensor, *, seq2seq: bool) -> int:
    """Tokens the loss is taken over: decoder-only models shift labels by one."""
    return int((labels != -100).sum()) if seq2seq else int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def evaluate(engine, loader, rt: Runtime, *, max_steps: int = 0, seq2seq: bool = False) -> float:
    """Mean loss per predicted token over the whole eval set, all ranks together. Ranks with fewer
    batches run masked-out forwards so that sharded models (FSDP, ZeRO-3) see the same collectives
    on every rank."""
    engine.model.eval()
    n_batches = all_reduce_max(rt, len(loader))
    if max_steps:
        n_batches = min(n_batches, max_steps)
    loss_sum, tokens = 0.0, 0.0
    it = iter(loader)
    spare = None
    for _ in range(n_batches):
        batch = next(it, None)
        if batch is None:  # this rank is out of examples: same forward, nothing counted
            spare = spare or {k: torch.ones((1, 2), dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}
            batch = dict(spare, labels=torch.full_like(spare["labels"], -100))
        spare = batch
        n = predicted_tokens(batch["labels"], seq2seq=seq2seq)
        with engine.autocast():
            loss = engine.model(**to_device(batch, rt.device)).loss
        if n:
            loss_sum += float(loss) * n
            tokens += n
    engine.model.train()
    loss_sum, tokens = all_reduce_sum(rt, [loss_sum, tokens])
    return loss_sum / max(tokens, 1.0)


def plan_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run (the LR schedule's length)."""
    total = steps_per_epoch * cfg.num_epochs
    return min(total, cfg.max_train_step) if cfg.max_train_step else total


@dataclass
class TrainResult:
    steps: int  # optimizer steps done, counting those before a resume
    steps_this_run: int
    last_loss: float
    tokens: int  # tokens processed in this run, all ranks
    seconds: float
    mfu: float | None
    preempted: bool = False  # stopped early on Slurm's warning signal (a checkpoint was written)


@dataclass(frozen=True)
class FlopsModel:
    n_params: int
    n_layers: int
    hidden: int
    peak_per_rank: float  # FLOP/s
    peak_source: str = "given"  # where the peak came from (GPU name, measured on CPU, peak_tflops)

    def batch_flops(self, tokens: int, seq_len: int) -> float:
        return tokens * (6.0 * self.n_params + 12.0 * self.n_layers * self.hidden * seq_len)


def train(engine, loader, cfg: TrainConfig, rt: Runtime, *, total_steps: int, state: TrainerState,
          metrics: MetricsWriter, progress: ProgressDisplay, flops: FlopsModel,
          save: Callable[[TrainerState], None], profiler=None, stop=None, seq2seq: bool = False,
          sample_log: "SampleLog | None" = None, beat: Progress | None = None) -> TrainResult:
    beat = beat or Progress()  # phase marks for the watchdog and the step statistics
    accum = cfg.gradient_accumulation_steps
    stop_at = min(total_steps, state.step + cfg.max_steps_this_run) if cfg.max_steps_this_run else total_steps
    first_step, last_loss, tokens_total, mfu = state.step, float("nan"), 0, None
    t_start = t_window = time.perf_counter()
    window = _new_window(rt)
    engine.model.train()
    sampler = loader.batch_sampler  # GlobalBatchSampler: the epoch's layout in global samples
    for epoch in range(state.epoch, cfg.num_epochs):
        if state.step >= stop_at:
            break
        start = state.samples_in_epoch if epoch == state.epoch else 0
        sampler.set_epoch(epoch, start)
        micro_steps = [sampler.steps.micro_count(k) for k in range(len(sampler.steps))]  # the same on every rank
        batches = beat.data(loader)
        for k, n_micro in enumerate(micro_steps):
            for m in range(n_micro):
                batch = next(batches)
                n_pred = predicted_tokens(batch["labels"], seq2seq=seq2seq)
                if n_pred:
                    window["tokens"] += int(batch["num_tokens"])
                    window["useful"] += n_pred
                    window["flops"] += flops.batch_flops(batch["input_ids"].numel(), batch["input_ids"].shape[1])
                beat.phase("forward")
                with engine.autocast():
                    out = engine.model(**to_device(batch, rt.device))
                # A filler micro-batch (every label masked) must still run the same collectives; its
                # loss is zero with a gradient path, where the model's own loss would be 0/0 = nan.
                loss = out.loss if n_pred else out.logits.float().sum() * 0.0
                beat.phase("backward")
                engine.backward(loss, boundary=m == n_micro - 1)
                window["loss"] += loss.detach().float() / accum
            if sample_log is not None:
                sample_log.write(state.step + 1, epoch, [i for mb in sampler.steps[k] for i in mb if i >= 0])
            beat.phase("optimizer")
            grad_norm = engine.step()
            window["steps"] += 1
            state.step += 1
            beat.step_done(state.step)
            consumed = start + (k + 1) * sampler.global_batch
            state.epoch, state.samples_in_epoch = (epoch + 1, 0) if consumed >= sampler.n else (epoch, consumed)
            if profiler is not None:
                profiler.step()
            stopping = None  # decided on this step by the metrics reduction, or below
            if state.step % cfg.log_every == 0 or state.step == stop_at:
                # One collective per logged step carries the metrics and the stop request together.
                beat.phase("metrics")
                loss_sum, tok, useful, fl, stop_votes = all_reduce_sum(
                    rt, [float(window["loss"]), window["tokens"], window["useful"], window["flops"],
                         1.0 if stop is not None and stop.requested else 0.0])
                stopping = stop_votes > 0
                now = time.perf_counter()
                dt = max(now - t_window, 1e-9)
                last_loss = loss_sum / rt.env.world_size / window["steps"]
                tokens_total += int(tok)
                mfu = fl / rt.env.world_size / dt / flops.peak_per_rank
                lr = engine.lr()
                metrics.write(step=state.step, epoch=epoch, loss=round(last_loss, 6), lr=lr,
                              grad_norm=round(grad_norm, 6), tokens=int(tok), seconds=round(dt, 4),
                              tokens_per_s=round(tok / dt, 1),
                              useful_tokens_per_s=round(useful / dt, 1), mfu=round(mfu, 5))
                progress.update(state.step, f"loss {last_loss:.4f} | lr {lr:.2e} | {tok / dt:,.0f} tok/s | MFU {mfu:.1%}")
                t_window = now
                window = _new_window(rt)
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < stop_at:
                save(state)
            if stop is not None and state.step < stop_at and (stop.agreed(rt) if stopping is None else stopping):
                return TrainResult(state.step, state.step - first_step, last_loss, tokens_total,
                                   time.perf_counter() - t_start, mfu, preempted=True)
            if state.step >= stop_at:
                break
    return TrainResult(state.step, state.step - first_step, last_loss, tokens_total,
                       time.perf_counter() - t_start, mfu)


class SampleLog:
    """Test-only record of the example ids each optimizer step trained on (SAMPLE_LOG_VAR), one JSON
    line per step and rank, so a test can check every example is seen once per epoch."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def write(self, step: int, epoch: int, ids: list[int]) -> None:
        self._f.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _new_window(rt: Runtime) -> dict:
    return {"loss": torch.zeros((), device=rt.device), "steps": 0, "tokens": 0, "useful": 0, "flops": 0.0}


def profiler_context(enabled: bool, out_dir, rank: int):
    if not enabled:
        return contextlib.nullcontext(None)
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(out_dir), worker_name=f"rank{rank}"))
