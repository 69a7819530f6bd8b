"""Checkpoints written atomically, and `resume: auto`.

    <run>/checkpoints/step-00000010.tmp/   being written (ignored by resume; removed on the next save)
    <run>/checkpoints/step-00000010/       complete: renamed from .tmp only after every rank finished
        dcp/ or zero/          engine state (torch.distributed.checkpoint, or DeepSpeed's own)
        engine.pt              scheduler / loss-scaler state (torch engines)
        rng-rank-00000.pt      each rank's RNG state
        trainer_state.json     step, epoch, batches consumed in that epoch
A crash mid-save never touches the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hpcft.errors import SpecError
from hpcft.paths import RunPaths
from hpcft.train.dist import Runtime, barrier

STATE_FILE = "trainer_state.json"
# Fault injection for the atomicity test: "STEP:SECONDS" pauses every save from STEP on while the
# checkpoint is half-written (shards on disk, not yet renamed), so a test can kill the job there.
FAULT_DELAY_ENV = "HPCFT_FAULT_SAVE_DELAY"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed


def step_dir(paths: RunPaths, step: int) -> Path:
    return paths.checkpoints / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()]


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


def save_checkpoint(engine, state: TrainerState, paths: RunPaths, rt: Runtime, *, keep: int) -> Path:
    final = step_dir(paths, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(rt)
    engine.save(tmp, is_main=rt.is_main)
    torch.save(_rng_state(), tmp / f"rng-rank-{rt.env.rank:05d}.pt")
    _fault_delay(state.step)
    barrier(rt)  # every rank's shards are on disk before the checkpoint is declared complete
    if rt.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in sorted(complete_checkpoints(paths.checkpoints), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(rt)
    return final


def _fault_delay(step: int) -> None:
    spec = os.environ.get(FAULT_DELAY_ENV)
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


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def find_resume(resume: str, paths: RunPaths) -> Path | None:
    """auto: the newest complete checkpoint of this run directory (a requeued or restarted job);
    latest: of any run of this job name (<output_dir>/<name>/*/checkpoints); never; or a path."""
    if resume == "never":
        return None
    if resume not in ("auto", "latest"):
        p = Path(resume)
        if not (p / STATE_FILE).is_file():
            raise SpecError("train.resume", f"{resume} is not a complete checkpoint (no {STATE_FILE}); "
                                            "use auto, latest, never, or a checkpoints/step-N directory")
        return p
    runs = [paths.run_dir] if resume == "auto" else [r for r in paths.run_dir.parent.glob("*") if r.is_dir()]
    found = [c for run in runs for c in complete_checkpoints(run / "checkpoints")]
    if not found:
        return None
    return max(found, key=lambda p: (_step_of(p), p.stat().st_mtime))


def agree_on_resume(resume: str, paths: RunPaths, rt: Runtime) -> Path | None:
    """Rank 0 picks, everyone loads the same one."""
    choice = [str(find_resume(resume, paths) or "")] if rt.is_main else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def load_checkpoint(engine, path: Path, rt: Runtime) -> TrainerState:
    engine.load(path)
    rng = path / f"rng-rank-{rt.env.rank:05d}.pt"
    if rng.exists():  # absent when resuming on more ranks than saved (resharding): keep the seed's RNG
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))
