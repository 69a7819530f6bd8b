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


def pick_device(env: DistEnv) -> tuple[torch.device, str]:
    """From what torch sees, never from Slurm's GPU variables (a CPU node may still be granted 'GPUs')."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count()), "nccl"
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
