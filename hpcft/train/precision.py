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


def apply_tf32(precision: str, tf32: bool | None, device: torch.device) -> bool:
    """TF32 tensor-core matmuls for fp32 on CUDA (Ampere and later): on by default for precision fp32
    there, as most trainers do (~8x the plain fp32 rate, 10-bit mantissa inputs, fp32 accumulation);
    tf32: false keeps exact fp32. Returns whether they are on (MFU then uses the TF32 peak)."""
    if device.type != "cuda":
        return False
    on = tf32 if tf32 is not None else precision == "fp32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on
