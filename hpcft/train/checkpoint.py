"""Checkpoints written atomically, and `resume: auto`.

    <run>/checkpoints/step-00000010.tmp/   being written (ignored by resume; removed on the next save)
    <run>/checkpoints/step-00000010/       complete: renamed from .tmp only after every rank finished
        dcp/ or zero/          engine state (torch.distributed.checkpoint, or DeepSpeed's own)
        engine.pt              scheduler / loss-scaler state (torch engines)
        rng-rank-000.pt        each rank's RNG state
        trainer_state.json     step, epoch, global samples consumed in that epoch, and the run's shape
                               (world size, micro-batch, accumulation, schedule length, strategy):
                               hpcft.worldplan.SavedRun
(names from hpcft.paths.CheckpointPaths). A crash mid-save never touches the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hpcft.distenv import FAULT_SAVE_DELAY_VAR
from hpcft.paths import CheckpointPaths, RunPaths
from hpcft.resume import complete_checkpoints, find_resume  # torch-free: the login node checks resume too
from hpcft.train.dist import Runtime, barrier
from hpcft.worldplan import SavedRun


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    samples_in_epoch: int = 0  # global samples of that epoch already consumed (any world size)


@dataclass(frozen=True)
class RunShape:
    """What a checkpoint records about the run that wrote it, so that a resume on another world size
    can keep what "continue" means (hpcft.worldplan.adapt)."""

    world_size: int
    micro_batch: int
    accum: int
    total_steps: int
    strategy: str
    use_peft: bool


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, state: TrainerState, paths: RunPaths, rt: Runtime, *, keep: int, shape: RunShape) -> Path:
    final = paths.checkpoint(state.step)
    tmp = final.tmp
    if rt.is_main:
        shutil.rmtree(tmp.dir, ignore_errors=True)
        tmp.dir.mkdir(parents=True)
    barrier(rt)
    engine.save(tmp, is_main=rt.is_main)
    torch.save(_rng_state(), tmp.rng(rt.env.rank))
    _fault_delay(state.step)
    barrier(rt)  # every rank's shards are on disk before the checkpoint is declared complete
    if rt.is_main:
        tmp.state.write_text(SavedRun(**asdict(state), **asdict(shape)).to_json())
        _fsync_dir(tmp.dir)
        if final.dir.exists():
            shutil.rmtree(final.dir)
        os.replace(tmp.dir, final.dir)
        _fsync_dir(final.dir.parent)
        for old in sorted(complete_checkpoints(paths), key=lambda c: c.step)[:-keep]:
            shutil.rmtree(old.dir, ignore_errors=True)
    barrier(rt)
    return final.dir


def _fault_delay(step: int) -> None:
    """Fault injection for the atomicity test: STEP:SECONDS pauses every save from STEP on while the
    checkpoint is half-written (shards on disk, not yet renamed), so a test can kill the job there."""
    spec = os.environ.get(FAULT_SAVE_DELAY_VAR)
    if spec:
        from_step, seconds = spec.split(":")
        if step >= int(from_step):
            time.sleep(float(seconds))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def agree_on_resume(resume: str, paths: RunPaths, rt: Runtime) -> Path | None:
    """Rank 0 picks, everyone loads the same one."""
    choice = [str(find_resume(resume, paths) or "")] if rt.is_main else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def load_checkpoint(engine, path: Path, rt: Runtime, *, saved: SavedRun) -> TrainerState:
    """Load `path` into the engine (resharding to this world size where it differs); the position to
    continue from, in global samples."""
    ckpt = CheckpointPaths(path)
    engine.load(ckpt)
    rng = ckpt.rng(rt.env.rank)
    if rng.exists():  # absent when resuming on more ranks than saved (resharding): keep the seed's RNG
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainerState(saved.step, saved.epoch, saved.samples_in_epoch)
