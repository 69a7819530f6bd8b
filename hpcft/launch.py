"""Per-node launcher: Slurm allocation -> torchrun with c10d rendezvous, one rank per GPU.

Inside a batch script (what `hpcft submit` renders):
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m hpcft.launch --node -- -m hpcft.train ...
Inside an interactive allocation (salloc -N2 --gpus-per-node=4, or an srun --pty shell):
    hpcft launch -- -m hpcft.train --max_train_step=20
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

from hpcft.distenv import (RDZV_PORT_VAR, RUN_DIR_VAR, Rendezvous, SlurmEnv, collect_slurm_env, flight_recorder_env,
                           plan_rendezvous)
from hpcft.errors import SpecError
from hpcft.paths import RunPaths
from hpcft.stopsignal import ignore_stop_signals

SRUN_FLAGS = ("--kill-on-bad-exit=1", "--ntasks-per-node=1")


def torchrun_argv(rdzv: Rendezvous, command: list[str], *, python: str = sys.executable) -> list[str]:
    """torchrun for one node; each rank runs `command` through hpcft.rankrun (per-rank log + exit record)."""
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(rdzv.nnodes),
        "--nproc-per-node", str(rdzv.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", rdzv.endpoint,
        "--rdzv-id", rdzv.run_id,
        "--max-restarts", "0",
        "-m", "hpcft.rankrun", *command,
    ]


def rank_threads(slurm: SlurmEnv, nproc: int) -> int:
    """CPU threads per rank: the task's CPUs shared among the node's ranks."""
    return max(1, (slurm.cpus_per_task or 1) // max(1, nproc))


def node_env(slurm: SlurmEnv, rdzv: Rendezvous, base: Mapping[str, str], *, cuda: bool) -> dict[str, str]:
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", str(rank_threads(slurm, rdzv.nproc_per_node)))
    elif env.get(RUN_DIR_VAR):  # NCCL's flight recorder, its dumps in the run directory (see hpcft/train/watchdog.py)
        env = {**flight_recorder_env(RunPaths(Path(env[RUN_DIR_VAR])).nccl_trace_prefix), **env}
    return env


def gpu_driver_present() -> bool:
    """An NVIDIA or AMD GPU driver on this node, from files alone (no torch import)."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))


def node_gpus() -> tuple[bool, int]:
    """(CUDA usable, devices) for this node. On nodes without a GPU driver the answer needs no torch
    import, which saves seconds of start-up per node on CPU partitions; GPU nodes ask torch."""
    if not gpu_driver_present():
        return False, 0
    import torch

    cuda = torch.cuda.is_available()
    return cuda, torch.cuda.device_count() if cuda else 0


def run_node(command: list[str], env: Mapping[str, str] | None = None) -> None:
    """Replace this process with torchrun for this node (never returns)."""
    base = dict(os.environ if env is None else env)
    slurm = collect_slurm_env(base)
    port = int(base[RDZV_PORT_VAR]) if base.get(RDZV_PORT_VAR) else None
    cuda, devices = node_gpus()
    rdzv = plan_rendezvous(slurm, cuda_devices=devices, port=port)
    child_env = node_env(slurm, rdzv, base, cuda=cuda)
    print(f"hpcft.launch: node {rdzv.node_rank}/{rdzv.nnodes} ({os.uname().nodename}) starts "
          f"{rdzv.nproc_per_node} {'GPU' if cuda else 'CPU'} ranks, rendezvous {rdzv.endpoint}", flush=True)
    argv = torchrun_argv(rdzv, command)
    # Slurm's warning signal (USR1, see launch.signal_lead_s; submitit's under that backend) reaches
    # every process of the step; torchrun would die of it. The ranks install their own handlers.
    ignore_stop_signals(child_env)
    os.execvpe(argv[0], argv, child_env)


def srun_argv(slurm: SlurmEnv, inner: list[str], *, python: str = sys.executable) -> list[str]:
    """srun that starts one node launcher on every node of the allocation."""
    # --ntasks too: inside a step, srun would otherwise take that step's SLURM_NTASKS (1) from the env.
    n = slurm.job_num_nodes
    argv = ["srun", *SRUN_FLAGS, f"--nodes={n}", f"--ntasks={n}"]
    if slurm.cpus_per_task:
        argv.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.in_step:
        # Inside an `srun --pty` shell the resources belong to that step; share them.
        argv.append("--overlap")
    return [*argv, python, "-m", "hpcft.launch", "--node", "--", *inner]


def launch_in_allocation(command: list[str], *, output_dir: str = "runs", name: str = "interactive",
                         env: Mapping[str, str] | None = None) -> None:
    """`hpcft launch`: start all ranks of the current allocation (never returns)."""
    base = dict(os.environ if env is None else env)
    slurm = collect_slurm_env(base)
    if not slurm.in_job:
        raise SpecError("SLURM_JOB_ID", "unset: not inside a Slurm allocation; start one with "
                                        "salloc --nodes=2 --gpus-per-node=4, or use hpcft submit")
    if RUN_DIR_VAR not in base:
        base[RUN_DIR_VAR] = str(RunPaths.for_job(Path(output_dir).resolve(), name, slurm.job_id or "0").run_dir)
    Path(base[RUN_DIR_VAR]).mkdir(parents=True, exist_ok=True)
    print(f"hpcft launch: run directory {base[RUN_DIR_VAR]}", flush=True)
    argv = srun_argv(slurm, command)
    os.execvpe(argv[0], argv, base)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    node = False
    if args and args[0] == "--node":
        node, args = True, args[1:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("usage: python -m hpcft.launch [--node] -- <python args: -m module ... | script.py ...>", file=sys.stderr)
        return 2
    if node:
        run_node(args)
    else:
        launch_in_allocation(args)
    return 0  # not reached: both exec


if __name__ == "__main__":
    sys.exit(main())
