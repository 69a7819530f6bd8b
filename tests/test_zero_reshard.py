"""ZeRO 1/2/3 checkpoints resume on another data-parallel world size (hpcft.train.universal).

Saved on 2 ranks after 3 steps, resumed on 4 ranks and on 1, with accumulation adjusted so every
step sees the same global batch: the next 3 losses equal the uninterrupted 2-rank run's within LOSS_TOL.
fp32 everywhere, so the only difference left is the order of the gradient sums (over ranks and
micro-batches: 4 micro-batches summed as 2+2, 1+1+1+1 or 4 in one rank). Measured: at most 1.2e-7,
one float32 rounding of a loss near 4.3. Throwing away the Adam moments and step after loading moves
the same losses by 2e-2 to 3e-2 and restarting the LR schedule by 2e-2 to 3e-2 (zero_reshard_worker.py
--control); ZeRO-2's wrong slices under round_robin_gradients moved the first loss by 2e-4.
About 65 s on 2 cores (three torchrun launches), up to 2 minutes while other work shares the cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcft.distenv import DistEnv
from hpcft.paths import CheckpointPaths
from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime
from hpcft.train.parallel import deepspeed_config
from hpcft.train.universal import ensure_universal, round_robin_problem

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "zero_reshard_worker.py"
LOSS_TOL = 1e-5
STAGES = ("1", "2", "3")


def launch(world: int, root: Path, phase: str) -> tuple[dict, str]:
    out = root / f"{phase}-{world}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           str(WORKER), f"--phase={phase}", f"--root={root}", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["stages"], proc.stdout + proc.stderr


def files(d: Path) -> dict:
    return {p.relative_to(d): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_zero_checkpoints_resume_on_other_world_sizes(tmp_path):
    ref, _ = launch(2, tmp_path, "ref")
    ckpts = {s: CheckpointPaths(tmp_path / f"zero{s}" / "step-00000003") for s in STAGES}
    saved = {s: files(c.dir / c.zero_tag) for s, c in ckpts.items()}

    grown, log = launch(4, tmp_path, "resume")
    assert log.count("Convert DeepSpeed Checkpoint to Universal Checkpoint") == 3  # once per stage, rank 0 only
    converted = {s: files(c.universal) for s, c in ckpts.items()}
    shrunk, log = launch(1, tmp_path, "resume")
    assert "Convert DeepSpeed Checkpoint" not in log  # the universal copy is reused

    for s, c in ckpts.items():
        assert files(c.dir / c.zero_tag) == saved[s]  # the original is untouched
        assert files(c.universal) == converted[s] and not c.universal_tmp.exists()
        want = ref[s]["after"]
        assert abs(want[-1]["loss"] - ref[s]["before"][0]["loss"]) > 1000 * LOSS_TOL  # the loss does move
        for world, got in ((4, grown[s]["after"]), (1, shrunk[s]["after"])):
            for w, g in zip(want, got, strict=True):
                where = f"zero{s} on {world} ranks, step {w['step']}"
                assert abs(w["loss"] - g["loss"]) <= LOSS_TOL, f"{where}: loss {g['loss']} != {w['loss']}"
                assert w["lr"] == g["lr"], f"{where}: lr {g['lr']} != {w['lr']} (scheduler state)"
                assert w["global_steps"] == g["global_steps"], where


def test_round_robin_checkpoint_is_refused_not_converted(tmp_path):
    """ZeRO-1/2 with round_robin_gradients records wrong parameter slices (DeepSpeed 0.19.8): converting
    such a checkpoint would resume from scrambled weights, so it is refused and nothing is written."""
    ckpt = CheckpointPaths(tmp_path / "step-00000003")
    (ckpt.dir / ckpt.zero_tag).mkdir(parents=True)
    torch.save({"ds_config": {"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "dp_world_size": 2},
               ckpt.dir / ckpt.zero_tag / "mp_rank_00_model_states.pt")
    with pytest.raises(RuntimeError, match="round_robin_gradients on 2 ranks.*resume it on 2 ranks"):
        ensure_universal(ckpt, is_main=True)
    assert sorted(p.name for p in ckpt.dir.iterdir()) == [ckpt.zero_tag]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_zero_configs_can_reshard(stage):
    conf = deepspeed_config(TrainConfig(strategy=f"zero{stage}"), Runtime(env=DistEnv(world_size=4), device=None,
                                                                         backend="gloo"), stage)
    assert not round_robin_problem(conf["zero_optimization"], 4)
