"""Narrow fixes to DeepSpeed, each on only while the installed DeepSpeed still needs it.

ZeRO-3's `_create_fp32_partitions` means to reuse a rank's parameter partition as its fp32 master
partition when the partition is already fp32 on the optimizer's device (DeepSpeed's own comment: "we
don't need another copy"). It tests `partition.device == self.device`, where self.device is a string
("cpu", "cuda:0"); a torch.device never equals a string, so every fp32 run keeps a second fp32 copy of
each rank's partition. For the length of that one method, self.device becomes a string that does equal
the matching torch.device, and DeepSpeed's intended branch is taken.

On CPU, DeepSpeed's comm backend loads its shared-memory op (`deepspeed_shm_comm`) as it starts: the
first rank on a machine compiles it with ninja (about 2 CPU-minutes), every later one waits on the
build's lock and checks it. Only `inference_all_reduce` (tensor-parallel inference) uses it; training
reduces through torch.distributed. `init_zero_comm` starts DeepSpeed's comm without it.
"""
from __future__ import annotations

import importlib
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


def init_zero_comm(backend: str) -> None:
    """deepspeed.init_distributed for training ranks: without the shared-memory op that only DeepSpeed's
    inference all-reduce uses (on CPU it is compiled, and loaded by every rank, for nothing)."""
    import deepspeed

    # by name: `import deepspeed.comm.torch as x` binds torch itself (deepspeed.comm imports torch)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(ds_torch_comm, "build_shm_op", None)):
        ds_torch_comm.build_shm_op = _no_shm_op
    deepspeed.init_distributed(dist_backend=backend)


def _no_shm_op():
    return None
