"""apply_* functions: model in, wrapped model out. The loop does not branch on the strategy."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcft.train.dist import Runtime


def apply_ddp(model: nn.Module, *, rt: Runtime) -> nn.Module:
    model = model.to(rt.device)
    if not rt.env.distributed:
        return model
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def apply_strategy(model: nn.Module, *, strategy: str, rt: Runtime) -> nn.Module:
    appliers: dict[str, Callable[..., nn.Module]] = {"ddp": apply_ddp}
    return appliers[strategy](model, rt=rt)


def no_sync(model: nn.Module, skip: bool) -> ContextManager:
    """Skip the gradient all-reduce on micro-batches that do not end an accumulation step."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        norms = [p.grad.detach().norm(2) for p in params]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
