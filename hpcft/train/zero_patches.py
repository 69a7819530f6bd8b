"""Narrow fixes to DeepSpeed, each on only while the installed DeepSpeed still needs it.

ZeRO-3's `_create_fp32_partitions` means to reuse a rank's parameter partition as its fp32 master
partition when the partition is already fp32 on the optimizer's device (DeepSpeed's own comment: "we
don't need another copy"). It tests `partition.device == self.device`, where self.device is a string
("cpu", "cuda:0"); a torch.device never equals a string, so every fp32 run keeps a second fp32 copy of
each rank's partition. For the length of that one method, self.device becomes a string that does equal
the matching torch.device, and DeepSpeed's intended branch is taken.
"""
from __future__ import annotations

import inspect

import torch


class _DeviceName(str):
    """A device string that equals the torch.device it names (torch.device defers == to it)."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, torch.device):
            return torch.device(str(self)) == other
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def fp32_partition_copy_bug() -> bool:
    """True while the installed DeepSpeed compares a torch.device with its device string there."""
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        # DeepSpeed's own code, also when this module has wrapped it already
        source = inspect.getsource(inspect.unwrap(DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions))
    except (ImportError, OSError, TypeError, AttributeError):
        return False
    return ".device == self.device" in source and torch.device("cpu") != "cpu"


def patch_fp32_partitions() -> bool:
    """Apply the fix when DeepSpeed needs it; returns whether it is (now) applied."""
    if not fp32_partition_copy_bug():
        return False
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions
    if getattr(original, "_hpcft_patch", False):
        return True

    def _create_fp32_partitions(self):
        device = self.device
        if type(device) is str:
            self.device = _DeviceName(device)
        try:
            return original(self)
        finally:
            self.device = device

    _create_fp32_partitions._hpcft_patch = True
    _create_fp32_partitions.__wrapped__ = original
    Stage3._create_fp32_partitions = _create_fp32_partitions
    return True
