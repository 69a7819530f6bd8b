"""Process group, device and rank-0 helpers for the training entrypoint."""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpcft.distenv import DistEnv


@dataclass(frozen=True)
class Runtime:
    env: DistEnv
    device: torch.device
    backend: str  # nccl on CUDA, gloo on CPU

    @property
    def is_main(self) -> bool:
        return self.env.is_main


class DeviceError(RuntimeError):
    """This rank has no GPU of its own."""


def gpu_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """The GPU a rank takes: its local rank when the node's ranks see all the node's GPUs (torchrun, one
    task per node), device 0 when each rank sees one GPU of its own (srun --gpus-per-task=1 or
    --gpu-bind); otherwise two ranks would share a GPU silently, and that is an error."""
    if visible >= max(local_world_size, local_rank + 1):
        return local_rank
    if visible == 1:
        return 0
    raise DeviceError(f"local rank {local_rank} of {local_world_size} on this node sees {visible} GPU(s) "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): ranks would share "
                      "GPUs; ask Slurm for one GPU per rank (--gpus-per-node = ranks per node)")


def pick_device(env: DistEnv) -> tuple[torch.device, str]:
    """From what torch sees, never from Slurm's GPU variables (a CPU node may still be granted 'GPUs')."""
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index(env.local_rank, env.local_world_size, torch.cuda.device_count())), "nccl"
    return torch.device("cpu"), "gloo"


def setup_distributed(env: DistEnv, *, timeout_s: int) -> Runtime:
    device, backend = pick_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend, rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return Runtime(env=env, device=device, backend=backend)


def barrier(rt: Runtime) -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(rt: Runtime, values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(rt: Runtime, value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=rt.device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def print0(rt: Runtime, *args: object) -> None:
    if rt.is_main:
        print(*args, flush=True)


def cleanup() -> None:
    """Destroy the process group once nothing holds it any more (the caller drops its references
    first): collect what is left, then destroy."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_per_rank(rt: Runtime, value: object) -> list:
    if not dist.is_initialized():
        return [value]
    out: list = [None] * rt.env.world_size
    dist.all_gather_object(out, value)
    return out
