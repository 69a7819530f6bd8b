"""AdamW and the learning-rate schedule (linear warmup, then cosine / linear decay or constant)."""
from __future__ import annotations

import math

import torch
from torch import nn

from hpcft.train.config import TrainConfig


def lr_lambda(cfg: TrainConfig, total_steps: int):
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


def adamw_impl(params: list[torch.Tensor]) -> dict:
    """fused (one kernel over all parameters, CPU and CUDA) where every parameter is a plain floating
    tensor on one device; foreach (one launch per group of tensors) otherwise, e.g. FSDP2's DTensors."""
    from torch.distributed.tensor import DTensor

    plain = all(type(p) is torch.Tensor or type(p) is nn.Parameter for p in params)
    if plain and not any(isinstance(p, DTensor) for p in params) and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters and its LR schedule, for every strategy. With
    offload_optimizer (ZeRO) it is DeepSpeed's CPU Adam in AdamW mode, which keeps the state in CPU memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **adamw_impl(params))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched
