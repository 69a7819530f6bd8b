"""Precision modes: fp32, bf16 autocast, fp16 autocast with loss scaling, pure bf16 weights."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # forward runs under autocast in this dtype
    param_dtype: torch.dtype  # weights (and so optimizer state) kept in this dtype
    loss_scaling: bool  # fp16: scale the loss so small gradients do not underflow

    def autocast(self, device: torch.device) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


PRECISIONS = {
    "fp32": Precision("fp32", None, torch.float32, False),
    "bf16": Precision("bf16", torch.bfloat16, torch.float32, False),
    "fp16": Precision("fp16", torch.float16, torch.float32, True),
    "pure_bf16": Precision("pure_bf16", None, torch.bfloat16, False),
}


def resolve_precision(name: str) -> Precision:
    return PRECISIONS[name]
