"""Jobs on the local Slurm cluster for the scaling and launch parts: through `hpcft submit`, and through
a hand-written sbatch + torchrun script of the kind llama-recipes' multi_node.slurm is."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import PY, ROOT, Setup, env_for, read_hpcft
from hpcft.distenv import RUN_DIR_VAR
from hpcft.paths import RunPaths

HAND_WRITTEN = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time=00:20:00
#SBATCH --output={out}/slurm-%j.out
export {run_dir_var}={out}/run
export OMP_NUM_THREADS={threads}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun {torchrun} --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={gpus} --rdzv-backend=c10d \\
  --rdzv-endpoint="$head:$((29500 + SLURM_JOB_ID % 1000))" --rdzv-id="$SLURM_JOB_ID" -m hpcft.train {flags}
"""


def spec_yaml(setup: Setup, name: str, out: Path, *, nodes: int, gpus: int, **train) -> str:
    flags = {a.split("=", 1)[0][2:]: a.split("=", 1)[1] for a in setup.train_flags(**train)}
    lines = [f"name: {name}", f"output_dir: {json.dumps(str(out))}", "resources:", f"  nodes: {nodes}",
             f"  gpus_per_node: {gpus}", f"  cpus_per_task: {gpus}", '  time: "00:20:00"', "train:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in flags.items()]
    return "\n".join(lines) + "\n"


def via_hpcft(setup: Setup, name: str, *, nodes: int, gpus: int, **train) -> dict:
    """`hpcft submit SPEC --wait`; returns the run summary, throughput and seconds from the command's
    start to the first optimizer step."""
    out = setup.out / "slurm" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = out / "spec.yaml"
    spec.write_text(spec_yaml(setup, "job", out, nodes=nodes, gpus=gpus, **train))
    t0 = time.time()
    proc = subprocess.run([PY, "-m", "hpcft.cli", "submit", str(spec), "--wait"], cwd=ROOT, env=env_for(1),
                          capture_output=True, text=True, timeout=1200)
    runs = sorted(p for p in (out / "job").glob("*") if p.is_dir())
    if proc.returncode != 0 or not runs:
        raise RuntimeError(f"hpcft submit {spec} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    result = read_hpcft(runs[-1], setup.warmup)
    result["to_first_step_s"] = result["first_step_time"] - t0
    return result


def via_sbatch(setup: Setup, name: str, *, nodes: int, gpus: int, **train) -> dict:
    out = setup.out / "slurm" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = out / "hand.sbatch"
    script.write_text(HAND_WRITTEN.format(
        name=name, nodes=nodes, gpus=gpus, cpus=gpus, threads=1, out=out, run_dir_var=RUN_DIR_VAR, torchrun=str(Path(PY).with_name("torchrun")),
        flags=" ".join(shlex.quote(f) for f in setup.train_flags(**train))))
    t0 = time.time()
    proc = subprocess.run(["sbatch", "--wait", str(script)], cwd=ROOT, env=env_for(1), capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0 or not RunPaths(out / "run").summary.exists():
        logs = "".join(p.read_text()[-2000:] for p in out.glob("slurm-*.out"))
        raise RuntimeError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr[-1000:]}\n{logs}")
    result = read_hpcft(out / "run", setup.warmup)
    result["to_first_step_s"] = result["first_step_time"] - t0
    return result
