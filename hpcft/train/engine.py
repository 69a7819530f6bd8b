"""One small interface over DDP/FSDP (torch) and DeepSpeed ZeRO, so the loop never branches on the
strategy: backward(loss, boundary) per micro-batch, step() per optimizer step, save/load a
checkpoint, full_state_dict() for export."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn

from hpcft.paths import CheckpointPaths
from hpcft.train.precision import Precision


class TorchEngine:
    """DDP and FSDP2: torch optimizer and scheduler, DCP checkpoints."""

    def __init__(self, model: nn.Module, hf_model: nn.Module, optimizer, scheduler, *, accum: int,
                 clip: float | None, precision: Precision, device: torch.device, peft: bool):
        self.model, self.hf_model = model, hf_model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accum, self.clip, self.precision, self.device, self.peft = accum, clip, precision, device, peft
        self.scaler = _grad_scaler(precision, device, sharded=hasattr(model, "set_requires_gradient_sync"))

    def autocast(self) -> ContextManager:
        return self.precision.autocast(self.device)

    def _sync_context(self, boundary: bool) -> ContextManager:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(boundary)
            return contextlib.nullcontext()
        if not boundary and hasattr(self.model, "no_sync"):  # DDP: no all-reduce on inner micro-batches
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        loss = loss / self.accum
        with self._sync_context(boundary):
            (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm([p for p in self.model.parameters() if p.grad is not None], self.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.peft, **kw)

    def _state(self, ckpt: CheckpointPaths, is_main: bool) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if is_main:
            extra = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}
            torch.save(extra, ckpt.engine_extra)
        msd, osd = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": msd, "optim": osd}

    def save(self, ckpt: CheckpointPaths, *, is_main: bool) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(ckpt, is_main), checkpoint_id=str(ckpt.dcp))

    def save_async(self, ckpt: CheckpointPaths, *, is_main: bool, group=None):
        """DCP's async save: the state is staged in host memory before this returns (training may then
        change the weights), and written by a background thread; returns its future."""
        import torch.distributed.checkpoint as dcp

        return dcp.async_save(self._state(ckpt, is_main), checkpoint_id=str(ckpt.dcp), process_group=group)

    def load(self, ckpt: CheckpointPaths) -> None:
        """DCP reshards on load: any saved world size works."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(ckpt.dcp))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._options())
        extra = torch.load(ckpt.engine_extra, weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def full_state_dict(self) -> dict | None:
        """The whole model on rank 0 (CPU), gathered from shards where needed; None on other ranks."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.model, options=self._options(full_state_dict=True, cpu_offload=True))
        rank = dist.get_rank() if dist.is_initialized() else 0
        return sd if rank == 0 else None


class ZeroEngine:
    """DeepSpeed ZeRO 1/2/3: DeepSpeed owns accumulation, clipping, loss scaling and checkpoints."""

    def __init__(self, engine, hf_model: nn.Module, *, stage: int, device: torch.device):
        self.model = engine
        self.hf_model = hf_model
        self.stage, self.device = stage, device

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()  # DeepSpeed casts the model itself (bf16 / fp16 sections)

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.model.set_gradient_accumulation_boundary(boundary)
        self.model.backward(loss)

    def step(self) -> float:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def save(self, ckpt: CheckpointPaths, *, is_main: bool) -> None:
        self.model.save_checkpoint(str(ckpt.dir), tag=ckpt.zero_tag)

    def load(self, ckpt: CheckpointPaths) -> None:
        """Weights, optimizer and scheduler state, step count. On a DP world size other than the saved
        one, through a universal checkpoint made once beside zero/ (hpcft.train.universal)."""
        from hpcft.train.universal import ensure_universal, round_robin_problem, saved_dp_world

        tag, world, saved = ckpt.zero_tag, self.model.seq_dp_world_size, saved_dp_world(ckpt)
        rank = dist.get_rank() if dist.is_initialized() else 0
        universal = saved != world
        if universal:
            zero = {"stage": self.stage, "round_robin_gradients": self.model.zero_round_robin_gradients()}
            if round_robin_problem(zero, world):
                raise RuntimeError(f"cannot load {ckpt.dir} (saved on {saved} ranks) on {world} ranks with "
                                   f"ZeRO-{self.stage} and round_robin_gradients: DeepSpeed would put the weights "
                                   "in the wrong places; set zero_optimization.round_robin_gradients to false")
            ensure_universal(ckpt, is_main=rank == 0)
            tag = ckpt.universal_tag
        # DeepSpeed reads "checkpoint": {"load_universal"} only while loading (0.19.8), so it is set
        # here, for this load, rather than in the config the engine was built with.
        self.model._config.load_universal_checkpoint = universal
        path, _ = self.model.load_checkpoint(str(ckpt.dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt.dir}")
        if universal and rank == 0:
            print(f"hpcft.zero: resumed {ckpt.dir} saved on {saved} ranks on {world} ranks "
                  f"(universal checkpoint {ckpt.universal})", flush=True)

    def full_state_dict(self) -> dict | None:
        """The whole model on rank 0 (CPU). ZeRO-3 gathers one module's parameters at a time and rank 0
        copies them to host memory before the next: gathering every parameter at once would put the
        whole model on every rank's GPU (a 70B model on each 80 GB GPU)."""
        module = self.model.module
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.stage != 3:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
        import deepspeed

        host: dict[int, torch.Tensor | None] = {}  # id(parameter) -> its full value on rank 0
        for sub in module.modules():
            params = [p for p in sub.parameters(recurse=False) if id(p) not in host]
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for p in params:
                    host[id(p)] = p.detach().cpu().clone() if rank == 0 else None
        if rank != 0:
            return None
        # Keys as the module names them (tied weights share one parameter); buffers are not partitioned.
        return {k: host[id(v)] if id(v) in host else v.detach().cpu().clone()
                for k, v in module.state_dict(keep_vars=True).items()}


def _grad_scaler(precision: Precision, device: torch.device, *, sharded: bool):
    if not precision.loss_scaling:
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global grad norm (over all shards), clipped to max_norm when given."""
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
