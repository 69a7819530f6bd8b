"""The training loop: gradient accumulation, clipping, warmup + decay, eval loss, metrics."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime, all_reduce_sum
from hpcft.train.metrics import MetricsWriter, ProgressDisplay
from hpcft.train.parallel import clip_grad_norm, no_sync


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_scheduler == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def build_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime, max_steps: int = 0) -> float:
    """Mean loss per predicted token over the whole eval set, all ranks together."""
    model.eval()
    loss_sum, tokens = 0.0, 0.0
    for i, batch in enumerate(loader):
        if max_steps and i >= max_steps:
            break
        batch = _to(batch, rt.device)
        n = float((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(model(**batch).loss) * n
        tokens += n
    model.train()
    loss_sum, tokens = all_reduce_sum(rt, [loss_sum, tokens])
    return loss_sum / max(tokens, 1.0)


@dataclass
class TrainResult:
    steps: int
    last_loss: float
    tokens: int
    seconds: float


def plan_steps(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, int]:
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total = steps_per_epoch * cfg.num_epochs
    if cfg.max_train_step:
        total = min(total, cfg.max_train_step)
    return steps_per_epoch, total


def train(model: nn.Module, loader, cfg: TrainConfig, rt: Runtime, *, total_steps: int,
          metrics: MetricsWriter, progress: ProgressDisplay) -> TrainResult:
    opt, sched = build_optimizer(model, cfg, total_steps)
    accum = cfg.gradient_accumulation_steps
    clip = cfg.gradient_clipping_threshold if cfg.gradient_clipping else None
    step, last_loss, tokens_total = 0, float("nan"), 0
    t_start = t_window = time.perf_counter()
    window_tokens = window_useful = 0.0
    model.train()
    for epoch in range(cfg.num_epochs):
        loader.sampler.set_epoch(epoch)
        n_batches = len(loader)
        micro_loss = 0.0
        for i, batch in enumerate(loader):
            ends_step = (i + 1) % accum == 0 or i + 1 == n_batches
            batch = _to(batch, rt.device)
            with no_sync(model, skip=not ends_step):
                loss = model(**batch).loss / accum
                loss.backward()
            micro_loss += float(loss.detach())
            window_tokens += float(batch["attention_mask"].sum())
            window_useful += float((batch["labels"] != -100).sum())
            if not ends_step:
                continue
            grad_norm = clip_grad_norm(model, clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                loss_sum, tok, useful = all_reduce_sum(rt, [micro_loss, window_tokens, window_useful])
                now = time.perf_counter()
                dt = max(now - t_window, 1e-9)
                last_loss = loss_sum / rt.env.world_size
                tokens_total += int(tok)
                lr = sched.get_last_lr()[0]
                metrics.write(step=step, epoch=epoch, loss=round(last_loss, 6), lr=lr, grad_norm=round(grad_norm, 6),
                              tokens_per_s=round(tok / dt, 1), useful_tokens_per_s=round(useful / dt, 1))
                progress.update(step, f"loss {last_loss:.4f} | lr {lr:.2e} | {tok / dt:,.0f} tok/s")
                t_window, window_tokens, window_useful = now, 0.0, 0.0
            micro_loss = 0.0
            if step >= total_steps:
                return TrainResult(step, last_loss, tokens_total, time.perf_counter() - t_start)
    return TrainResult(step, last_loss, tokens_total, time.perf_counter() - t_start)
