"""Which checkpoint a run resumes from, without torch: the ranks ask it at start-up (through
hpcft.train.checkpoint), the login node asks it before the queue to check that the resume can work.

    find_resume("latest", RunPaths.for_job("runs", "samsum-tiny", job_id))   # newest complete checkpoint
    check_resume(spec)                                                        # SpecError if it cannot resume
"""
from __future__ import annotations

from pathlib import Path

from hpcft import worldplan
from hpcft.errors import SpecError
from hpcft.paths import CheckpointPaths, RunPaths, job_dir

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint writes it last, on the coordinator rank


def complete_checkpoints(paths: RunPaths) -> list[CheckpointPaths]:
    return [c for c in paths.checkpoint_dirs() if c.state.is_file()]


def find_resume(resume: str, paths: RunPaths) -> Path | None:
    """auto: the newest complete checkpoint of this run directory (a requeued or restarted job);
    latest: of any run of this job name (<output_dir>/<name>/*/checkpoints); never; or a path."""
    if resume == "never":
        return None
    if resume not in ("auto", "latest"):
        given = CheckpointPaths(Path(resume))
        if not given.state.is_file():
            raise SpecError("train.resume", f"{resume} is not a complete checkpoint (no {given.state.name}); "
                                            "use auto, latest, never, or a checkpoints/step-N directory")
        return given.dir
    runs = [paths] if resume == "auto" else paths.sibling_runs()
    found = [c for run in runs for c in complete_checkpoints(run)]
    if not found:
        return None
    return max(found, key=lambda c: (c.step, c.dir.stat().st_mtime)).dir


def check_resume(spec) -> None:
    """The checkpoint a new job would resume from (a path, or `latest`) is complete, was written by a
    strategy that can load it, and can continue on every world size the job may get (worldplan).
    `auto` looks only in the new job's own run directory, which exists only once Slurm requeues it."""
    t = spec.train
    if t.resume in ("never", "auto"):
        return
    # The new job's id is not known yet; any name finds the same siblings.
    found = find_resume(t.resume, RunPaths(job_dir(spec.output_dir, spec.name) / "new"))
    if found is None:
        return  # latest with no checkpoint yet: the run starts afresh, as on the ranks
    ckpt = CheckpointPaths(found)
    zero = (ckpt.dir / ckpt.zero_tag).is_dir()
    dcp = (ckpt.dcp / DCP_METADATA).is_file()
    wants_zero = t.strategy.startswith("zero")
    if wants_zero and not zero or not wants_zero and not dcp:
        other = "ZeRO (zero/)" if zero else "ddp/fsdp (dcp/)" if dcp else None
        if other is None:
            raise SpecError("train.resume", f"{found} is not a complete checkpoint (no dcp/{DCP_METADATA} or "
                                            f"zero/); point resume at another checkpoints/step-N, or use never")
        raise SpecError("train.resume", f"{found} holds a {other} checkpoint, which strategy {t.strategy} cannot "
                                        "load; resume with the strategy that wrote it, or use never")
    try:
        saved = worldplan.read_saved(found)
    except (OSError, ValueError, TypeError) as exc:
        raise SpecError("train.resume", f"cannot read {ckpt.state} ({exc}); point resume at another "
                                        "checkpoint, or use never") from None
    nodes = spec.resources.nodes
    for n in nodes.counts():
        try:
            worldplan.adapt(saved, world_size=n * max(1, spec.resources.gpus_per_node),
                            micro_batch=t.batch_size_training, accum=t.gradient_accumulation_steps,
                            strategy=t.strategy, use_peft=t.use_peft)
        except SpecError as exc:
            on = f", on {n} of resources.nodes {nodes}" if nodes.elastic else ""
            raise SpecError(exc.field, f"{str(exc).removeprefix(exc.field + ': ')} (checkpoint {found}{on})") from None
