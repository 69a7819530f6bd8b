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
import threading
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


def save_checkpoint(engine, state: TrainerState, paths: RunPaths, rt: Runtime, *, keep: int, shape: RunShape,
                    background: "AsyncCheckpointer | None" = None) -> Path:
    """Write step-N.tmp/ and rename it to step-N/ once every rank's part is on disk. With `background`
    (train.async_checkpoint, ddp/fsdp) the engine state is copied to host memory here and written by a
    background thread while training goes on; the rename happens when that write is complete."""
    final = paths.checkpoint(state.step)
    tmp = final.tmp
    if background is not None:
        background.wait()  # one save in flight: the previous one is complete (and renamed) first
    if rt.is_main:
        shutil.rmtree(tmp.dir, ignore_errors=True)
        tmp.dir.mkdir(parents=True)
    barrier(rt)
    saved = SavedRun(**asdict(state), **asdict(shape)).to_json()
    torch.save(_rng_state(), tmp.rng(rt.env.rank))
    if background is not None:
        # Every rank has written its RNG file before it joins the save's collectives, so the write's
        # completion on rank 0 means the whole checkpoint is on disk.
        background.start(engine, tmp, final, saved, paths, rt, keep=keep, step=state.step)
        return final.dir
    engine.save(tmp, is_main=rt.is_main)
    _fault_delay(state.step)
    barrier(rt)  # every rank's shards are on disk before the checkpoint is declared complete
    if rt.is_main:
        _publish(tmp, final, saved, paths, keep)
    barrier(rt)
    return final.dir


def _publish(tmp: CheckpointPaths, final: CheckpointPaths, saved: str, paths: RunPaths, keep: int) -> None:
    """Rank 0: the state file last, then the atomic rename, then the oldest beyond `keep` go."""
    tmp.state.write_text(saved)
    _fsync_dir(tmp.dir)
    if final.dir.exists():
        shutil.rmtree(final.dir)
    os.replace(tmp.dir, final.dir)
    _fsync_dir(final.dir.parent)
    for old in sorted(complete_checkpoints(paths), key=lambda c: c.step)[:-keep]:
        shutil.rmtree(old.dir, ignore_errors=True)


class AsyncCheckpointer:
    """train.async_checkpoint: DCP's async save on a gloo group of its own (its collectives run in a
    background thread and must not interleave with training's), at most one save in flight. Rank 0's
    finisher thread waits for the write, then publishes the checkpoint (state file, rename, pruning);
    a crash before that leaves step-N.tmp/, and resume takes the last complete one."""

    def __init__(self, rt: Runtime):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._future = None
        self._finisher: threading.Thread | None = None
        self._error: list[BaseException] = []
        self._written: list[dict] = []  # rank 0: {"step", "write_s"} of each save published since drain()

    def start(self, engine, tmp: CheckpointPaths, final: CheckpointPaths, saved: str, paths: RunPaths, rt: Runtime,
              *, keep: int, step: int) -> None:
        started = time.perf_counter()
        self._future = engine.save_async(tmp, is_main=rt.is_main, group=self.group)
        if rt.is_main:
            self._finisher = threading.Thread(target=self._finish,
                                              args=(self._future, tmp, final, saved, paths, keep, step, started),
                                              name="hpcft-checkpoint", daemon=True)
            self._finisher.start()

    def _finish(self, future, tmp, final, saved, paths, keep, step, started) -> None:
        try:
            future.result()
            _fault_delay(step)
            _publish(tmp, final, saved, paths, keep)
            self._written.append({"step": step, "write_s": round(time.perf_counter() - started, 4)})
        except BaseException as exc:  # noqa: BLE001 - reported by wait() in the training thread
            self._error.append(exc)

    def wait(self) -> None:
        """Block until the save in flight is written and published; its error, if any, raised here."""
        if self._future is not None:
            self._future.result()
            self._future = None
        if self._finisher is not None:
            self._finisher.join()
            self._finisher = None
        if self._error:
            raise RuntimeError(f"the background checkpoint failed: {self._error.pop()}")

    def drain(self) -> list[dict]:
        """The saves published in the background since the last call (rank 0; empty elsewhere)."""
        done, self._written = self._written, []
        return done


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
