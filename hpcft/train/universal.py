"""Resume a DeepSpeed ZeRO checkpoint on a different data-parallel world size.

DeepSpeed refuses a ZeRO checkpoint whose DP world size differs from the current one ("The checkpoint
being loaded used a DP world size of 2 but the current world size is 4"): each rank's file holds
that rank's flat slice of the fp32 weights and Adam moments. DeepSpeed's own converter
(deepspeed.checkpoint.ds_to_universal) rewrites the slices as one file per parameter and state
(fp32, exp_avg, exp_avg_sq, step), which any world size re-slices when loaded with "load_universal".
The original <ckpt>/zero/ stays as it was; the converted copy is <ckpt>/universal/
(CheckpointPaths.universal), written once by rank 0 through universal.tmp/ and reused by every later
resume, whatever its world size.

ZeRO-1/2 with round_robin_gradients on more than one rank cannot go through it (DeepSpeed 0.19.8):
the optimizer links each parameter to its slice of the flat fp32 partition in the original parameter
order while the flat buffer is in round-robin order, so the slice addresses the converter reads, and
the ones a universal load writes through, point at other parameters' values. Checked, not converted.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from hpcft.paths import CheckpointPaths


def saved_dp_world(ckpt: CheckpointPaths) -> int:
    """The DP world size a ZeRO checkpoint was saved with: DeepSpeed writes one optimizer-state file
    per DP rank (zero_pp_rank_<dp>_mp_rank_00_optim_states.pt; bf16_ prefixed with the bf16 optimizer)."""
    files = list((ckpt.dir / ckpt.zero_tag).glob("*zero_pp_rank_*_optim_states.pt"))
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer-state files in {ckpt.dir / ckpt.zero_tag}")
    return len(files)


def round_robin_problem(zero_config: dict, world: int) -> bool:
    """True where the slice addresses of a ZeRO-1/2 optimizer are wrong (see the module docstring)."""
    return zero_config.get("stage", 0) in (1, 2) and bool(zero_config.get("round_robin_gradients")) and world > 1


def check_source(src: Path) -> None:
    """Refuse a checkpoint whose slice addresses are wrong, before converting it to garbage."""
    model_states = sorted(src.glob("*mp_rank_00_model_states.pt"))
    if not model_states:
        raise FileNotFoundError(f"no DeepSpeed model-state file in {src}")
    saved = torch.load(model_states[0], map_location="cpu", weights_only=False)
    zero = saved.get("ds_config", {}).get("zero_optimization", {})
    if round_robin_problem(zero, saved.get("dp_world_size", 1)):
        raise RuntimeError(f"{src} was saved by ZeRO-{zero['stage']} with round_robin_gradients on "
                           f"{saved['dp_world_size']} ranks: DeepSpeed recorded wrong parameter slices, so it "
                           f"cannot be converted to another world size; resume it on {saved['dp_world_size']} ranks")


def convert(src: Path, dst: Path, staging: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process and without worker processes (a fork of a rank
    that holds a process group is not safe). Written under staging, then renamed to dst, which must
    not exist: dst is complete whenever it exists."""
    from deepspeed.checkpoint import ds_to_universal

    if dst.exists():
        raise FileExistsError(dst)
    check_source(src)
    # ds_to_universal also writes a latest_universal file beside its output folder: inside staging,
    # so the checkpoint directory gets nothing but the finished dst.
    shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that died
    out = staging / dst.name
    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # hpcft models carry no Megatron-style universal_checkpoint_info (no tensor or
                              # pipeline parallel patterns): the converter adds the empty one they need.
                              inject_missing_state=True)
    ds_to_universal.main(args)
    os.replace(out, dst)
    shutil.rmtree(staging)


def ensure_universal(ckpt: CheckpointPaths, *, is_main: bool) -> Path:
    """<ckpt>/universal/, converted by rank 0 from <ckpt>/zero/ unless it is there already. Every rank
    returns once it exists, or raises rank 0's error (not a peer's lost connection)."""
    error, cause = None, None
    if is_main and not ckpt.universal.is_dir():
        try:
            convert(ckpt.dir / ckpt.zero_tag, ckpt.universal, ckpt.universal_tmp)
        except Exception as exc:  # every rank raises it below
            error, cause = f"{type(exc).__name__}: {exc}", exc
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)  # doubles as the barrier: nobody reads before rank 0 is done
        error = box[0]
    if error:
        raise RuntimeError(f"converting {ckpt.dir / ckpt.zero_tag} to a universal checkpoint failed on rank 0: {error}") from cause
    if not ckpt.universal.is_dir():
        raise FileNotFoundError(f"{ckpt.universal} is not visible on this rank after rank 0 converted it "
                                "(checkpoint directory not on a shared file system?)")
    return ckpt.universal
