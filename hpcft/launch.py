"""Per-node launcher: Slurm allocation -> torchrun with c10d rendezvous, one rank per GPU.

Inside a batch script (what `hpcft submit` renders):
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m hpcft.launch --node -- -m hpcft.train ...
Inside an interactive allocation (salloc -N2 --gpus-per-node=4, or an srun --pty shell):
    hpcft launch -- -m hpcft.train --max_train_step=20
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import dataclasses

from hpcft.distenv import (CPU_NODE_VAR, JOB_PORTS, PER_TASK_GPU_VARS, RDZV_PORT_VAR, RUN_DIR_VAR, STEP_WAIT_VAR,
                           Rendezvous, SlurmEnv, collect_slurm_env, nccl_env, plan_rendezvous)
from hpcft import rdzvstore
from hpcft.errors import SpecError
from hpcft.network import (SOCKET_IFNAME_VARS, NetworkError, await_port, infiniband_devices, interface_for, pick_port,
                           port_free, publish_port, resolve_head)
from hpcft.paths import RunPaths, launch_run_dir
from hpcft.stopsignal import ignore_stop_signals

SRUN_FLAGS = ("--kill-on-bad-exit=1", "--ntasks-per-node=1")
STEP_WAIT_S = 60  # hpcft launch: how long Slurm may take to place the launchers (STEP_WAIT_VAR overrides)
STEP_REFUSED = "Unable to create step"  # srun's words when --immediate ran out (or the step cannot exist)


def torchrun_argv(rdzv: Rendezvous, command: list[str], *, python: str = sys.executable,
                  store_hosted: bool = False) -> list[str]:
    """torchrun for one node; each rank runs `command` through hpcft.rankrun (per-rank log + exit record).
    store_hosted: the head node's launcher hosts the rendezvous store (hpcft.rdzvstore), every agent is a client."""
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(rdzv.nnodes),
        "--nproc-per-node", str(rdzv.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", rdzv.endpoint,
        "--rdzv-id", rdzv.run_id,
        *(rdzvstore.AGENT_CONF if store_hosted else ()),
        "--max-restarts", "0",
        "-m", "hpcft.rankrun", *command,
    ]


def node_cores() -> int:
    """The cores this launcher may run on (its affinity mask: what Slurm's cgroup or binding gave it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def rank_threads(slurm: SlurmEnv, nproc: int, *, cores: int | None = None) -> int:
    """CPU threads per rank: the task's CPUs shared among the node's ranks, never more than the cores
    there are (a node that advertises more CPUs than it has would otherwise run threads x ranks on them)."""
    cpus = slurm.cpus_per_task or 1
    if cores is not None:
        cpus = min(cpus, cores)
    return max(1, cpus // max(1, nproc))


def node_env(slurm: SlurmEnv, rdzv: Rendezvous, base: Mapping[str, str], *, cuda: bool,
             cores: int | None = None) -> dict[str, str]:
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not cuda:
        cores = node_cores() if cores is None else cores
        threads = rank_threads(slurm, rdzv.nproc_per_node, cores=cores)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        if int(env["OMP_NUM_THREADS"] or 1) > 1:
            # OpenMP threads that spin between parallel regions burn the cores the other ranks and gloo's
            # own threads need: a 2-thread CPU rank took 21-25 CPU-s instead of 7 beside its peers. Ranks
            # alternate compute with collectives, so idle threads sleep here unless the user said otherwise.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # A user's script runs through hpcft.cpuworld here (hpcft.rankrun), so that Accelerate and HF
        # Trainer form one CPU world rather than N single-process runs that each "succeed".
        env[CPU_NODE_VAR] = "1"
    else:  # hpcft's NCCL defaults and the flight recorder (dumps in the run directory; hpcft/train/watchdog.py)
        trace = RunPaths(Path(env[RUN_DIR_VAR])).nccl_trace_prefix if env.get(RUN_DIR_VAR) else None
        env = {**nccl_env(trace), **env}
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


def plan_network(rdzv: Rendezvous, slurm: SlurmEnv, env: Mapping[str, str], *, fixed_port: bool) -> tuple[
        Rendezvous, dict[str, str], str]:
    """Before rendezvous: the head node resolves here (NetworkError naming both if not); the interface
    that reaches it, for gloo and NCCL unless the user set one; the port: the head node's launcher keeps
    the job id's port when it is free and otherwise takes the next free one (two jobs sharing a node),
    and publishes it in the run directory, where the other nodes read it. Returns the rendezvous, the
    variables to export and a line for the log."""
    head = resolve_head(rdzv.host)
    iface = interface_for(head)
    extra = {var: iface for var in SOCKET_IFNAME_VARS if iface and not env.get(var)}
    chosen = ", ".join(f"{v}={env[v]}" for v in SOCKET_IFNAME_VARS if env.get(v)) or \
        (f"{iface} for gloo and NCCL" if iface else "no interface holds the route's source address: left to gloo/NCCL")
    port_note = ""
    run_dir = env.get(RUN_DIR_VAR)
    if run_dir:
        published = RunPaths(Path(run_dir)).rendezvous_port(launch_key(slurm))
        if rdzv.node_rank == 0:
            if fixed_port and not port_free(rdzv.port):
                raise NetworkError(f"launch.rdzv_port {rdzv.port} is taken on the head node {rdzv.host}; leave "
                                   "rdzv_port unset (a free port is then picked) or choose another")
            port = pick_port(rdzv.port, avoid=JOB_PORTS)
            if port != rdzv.port:
                port_note = f" (the job id's port {rdzv.port} is taken on {rdzv.host})"
            publish_port(published, rdzv.host, port)
        else:
            port = await_port(published)
        rdzv = dataclasses.replace(rdzv, port=port)
    ib = infiniband_devices()
    line = (f"hpcft.launch: network on {os.uname().nodename}: head node {rdzv.host} is {head}, reached through "
            f"{chosen}; rendezvous port "
            f"{rdzv.port}{port_note}" + (f"; InfiniBand devices here: {', '.join(ib)}" if ib else ""))
    return rdzv, extra, line


def launch_key(slurm: SlurmEnv) -> str:
    """One launch of a job (job id, restart count, step id): a requeue or a second `hpcft launch` in the same
    allocation never reads an earlier launch's port or leave files."""
    return f"{slurm.job_id}-{slurm.restart_count}-{slurm.step_id}"


def run_node(command: list[str], env: Mapping[str, str] | None = None) -> int:
    """torchrun for this node; its exit status, except that an agent failing after every rank of this node
    exited 0 (torchrun's store host on another node left first, at shutdown) is not a failure."""
    base = dict(os.environ if env is None else env)
    slurm = collect_slurm_env(base)
    port = int(base[RDZV_PORT_VAR]) if base.get(RDZV_PORT_VAR) else None
    cuda, devices = node_gpus()
    rdzv = plan_rendezvous(slurm, cuda_devices=devices, port=port)
    try:
        rdzv, net_env, net_line = plan_network(rdzv, slurm, base, fixed_port=port is not None)
    except NetworkError as exc:
        print(f"hpcft.launch: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    child_env = {**node_env(slurm, rdzv, base, cuda=cuda), **net_env}
    print(net_line, flush=True)
    print(f"hpcft.launch: node {rdzv.node_rank}/{rdzv.nnodes} ({os.uname().nodename}) starts "
          f"{rdzv.nproc_per_node} {'GPU' if cuda else 'CPU'} ranks, rendezvous {rdzv.endpoint}", flush=True)
    hosted = rdzvstore.hosted(rdzv.nnodes, base.get(RUN_DIR_VAR))
    argv = torchrun_argv(rdzv, command, store_hosted=hosted)
    # Slurm's warning signal (USR1, see launch.signal_lead_s; submitit's under that backend) reaches
    # every process of the step; torchrun would die of it. The ranks install their own handlers.
    ignore_stop_signals(child_env)
    proc = subprocess.Popen(argv, env=child_env)
    store = None
    if hosted and rdzv.node_rank == 0:
        # Opened while torchrun imports torch (its agent retries until the store answers), so the head
        # node pays its own torch import beside torchrun's rather than before it.
        try:
            store = rdzvstore.open_store(rdzv.port)
        except RuntimeError as exc:
            proc.kill()
            proc.wait()
            print(f"hpcft.launch: error: cannot host the rendezvous store on {rdzv.endpoint}: "
                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; another process took the port "
                  "since it was chosen: submit again, or set launch.rdzv_port to a free one", file=sys.stderr, flush=True)
            return 1
    rc = proc.wait()
    here = os.uname().nodename
    finished = rc == 0 or (RUN_DIR_VAR in base and ranks_here_finished(RunPaths(Path(base[RUN_DIR_VAR])), here,
                                                                        rdzv.nproc_per_node))
    if hosted:
        leave_in_order(RunPaths(Path(base[RUN_DIR_VAR])), launch_key(slurm), rdzv, finished)
    del store  # the head node's store closes here, after the other nodes left
    if rc != 0 and finished:
        print(f"hpcft.launch: torchrun on {here} exited {rc} after all {rdzv.nproc_per_node} of its ranks exited 0 "
              "(its agent failed while shutting down): not a failure", file=sys.stderr, flush=True)
        return 0
    return rc if rc >= 0 else 128 - rc


def leave_in_order(paths: RunPaths, key: str, rdzv: Rendezvous, finished: bool) -> None:
    """The other nodes say they left; the head node, which hosts the store, waits for them once its ranks
    finished (after a failure srun ends the step anyway) and names any that never said so."""
    if rdzv.node_rank != 0:
        rdzvstore.mark_left(paths.launcher_left(key, rdzv.node_rank))
        return
    if not finished:
        return
    missing = rdzvstore.await_left([paths.launcher_left(key, r) for r in range(1, rdzv.nnodes)],
                                   rdzvstore.LEAVE_WAIT_S)
    if missing:
        print(f"hpcft.launch: closing the rendezvous store after {rdzvstore.LEAVE_WAIT_S:.0f} s without word from "
              f"node(s) {', '.join(p.name.removeprefix('node') for p in missing)} of {rdzv.nnodes}", file=sys.stderr,
              flush=True)
    else:
        print(f"hpcft.launch: rendezvous store closed after the other {rdzv.nnodes - 1} node(s) left", flush=True)


def ranks_here_finished(paths: RunPaths, host: str, nproc: int) -> bool:
    """Every rank this node started left an exit record saying it exited 0."""
    from hpcft.logs import read_exits

    here = [e for e in read_exits(paths).values() if e.host == host]
    return len(here) >= nproc and all(e.returncode == 0 for e in here)


def srun_argv(slurm: SlurmEnv, inner: list[str], *, python: str = sys.executable,
              step_wait_s: int = STEP_WAIT_S) -> list[str]:
    """srun that starts one node launcher on every node of the allocation; it gives up after step_wait_s
    when other steps hold the nodes (a pending step would otherwise wait silently, forever)."""
    # --ntasks too: inside a step, srun would otherwise take that step's SLURM_NTASKS (1) from the env.
    n = slurm.job_num_nodes
    argv = ["srun", *SRUN_FLAGS, f"--nodes={n}", f"--ntasks={n}", f"--immediate={step_wait_s}"]
    if slurm.node_launcher_cpus:
        argv.append(f"--cpus-per-task={slurm.node_launcher_cpus}")
    if slurm.node_launcher_gres:
        argv.append(f"--gres={slurm.node_launcher_gres}")  # with PER_TASK_GPU_VARS dropped from its env
    if slurm.in_step:
        # Inside an `srun --pty` shell the resources belong to that step; share them.
        argv.append("--overlap")
    return [*argv, python, "-m", "hpcft.launch", "--node", "--", *inner]


def launch_in_allocation(command: list[str], *, output_dir: str = "runs", name: str = "interactive",
                         env: Mapping[str, str] | None = None) -> int:
    """`hpcft launch`: start all ranks of the current allocation and wait for them; the status is the
    training's (0 when every rank finished), and a failure names the rank that failed first."""
    base = dict(os.environ if env is None else env)
    slurm = collect_slurm_env(base)
    if not slurm.in_job:
        raise SpecError("SLURM_JOB_ID", "unset: not inside a Slurm allocation; start one with "
                                        "salloc --nodes=2 --gpus-per-node=4, or use hpcft submit")
    if RUN_DIR_VAR not in base:
        base[RUN_DIR_VAR] = str(launch_run_dir(Path(output_dir).resolve(), name, slurm.job_id or "0"))
    Path(base[RUN_DIR_VAR]).mkdir(parents=True, exist_ok=True)
    print(f"hpcft launch: run directory {base[RUN_DIR_VAR]}", flush=True)
    wait_s = int(base.get(STEP_WAIT_VAR) or STEP_WAIT_S)
    argv = srun_argv(slurm, command, step_wait_s=wait_s)
    for var in PER_TASK_GPU_VARS:
        base.pop(var, None)
    proc = subprocess.Popen(argv, env=base, stderr=subprocess.PIPE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is srun's to handle (it cancels the step)
    refused = copy_watching(proc.stderr, sys.stderr.buffer, STEP_REFUSED)
    rc = proc.wait()
    if rc != 0 and refused:
        print(f"hpcft launch: error: {placement_error(slurm, refused, wait_s)}", file=sys.stderr, flush=True)
        return 2
    if rc != 0:
        print(f"hpcft launch: {describe_failure(RunPaths(Path(base[RUN_DIR_VAR])))}", file=sys.stderr, flush=True)
    return rc if rc >= 0 else 128 - rc


def copy_watching(source, sink, needle: str) -> str | None:
    """Copy srun's stderr through line by line (it carries the launchers' and torchrun's own lines) until it
    ends; the first line holding `needle`, if any."""
    found = None
    for raw in iter(source.readline, b""):
        sink.write(raw)
        sink.flush()
        line = raw.decode(errors="replace").strip()
        if found is None and needle in line:
            found = line
    return found


def placement_error(slurm: SlurmEnv, srun_line: str, wait_s: int) -> str:
    """One line: srun could not place a launcher on every node (nothing started), what holds the nodes, the fix."""
    from hpcft.jobs import running_steps

    why = srun_line.split(": ")[-1] if ": " in srun_line else srun_line
    shell = f"{slurm.job_id}.{slurm.step_id}"
    others = [s for s in running_steps(slurm.job_id or "") if not s.startswith(shell + " ")] if slurm.in_step else \
        running_steps(slurm.job_id or "")
    held = (f"step(s) {', '.join(others)} hold them: wait for them or end them (scancel {others[0].split()[0]}), "
            "then launch again") if others else ""
    if slurm.in_step and not others:
        held = (f"this shell's step {shell} holds resources Slurm will not share with another step: start the shell "
                "with srun --overlap ... --pty bash, or run hpcft launch from an salloc shell")
    return (f"Slurm could not place a launcher on each of the {slurm.job_num_nodes} node(s) within {wait_s} s ({why}), "
            f"so no rank started{': ' + held if held else ''} ({STEP_WAIT_VAR}=SECONDS waits longer)")


def describe_failure(paths: RunPaths) -> str:
    """One line: the rank that failed first and where its log is, or what is known without one."""
    from hpcft.logs import first_failure

    if paths.refused.exists():
        return f"refused before any rank started: {paths.refused.read_text().strip()}"
    failure = first_failure(paths)
    if failure is None:
        return f"failed before any rank reported (srun's output above); run directory {paths.run_dir}"
    last = next((line.strip() for line in reversed(failure.tail) if line.strip()), "")
    return (f"failed: rank {failure.rank} on {failure.host or 'unknown host'} ({failure.reason})"
            + (f": {last}" if last else "") + f"; its log: {paths.rank_log(failure.rank)}")


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
    try:
        check_entry_flags(args)
        refusal = None
    except SpecError as exc:
        refusal = f"hpcft.train: error: {exc}"
    if refusal:
        if os.environ.get("SLURM_NODEID", "0") == "0":  # one line per job, not one per node
            print(refusal, file=sys.stderr, flush=True)
            if node and os.environ.get(RUN_DIR_VAR):
                RunPaths(Path(os.environ[RUN_DIR_VAR])).refused.write_text(refusal + "\n")
        return 2
    if node:
        return run_node(args)
    return launch_in_allocation(args)


def check_entry_flags(command: list[str]) -> None:
    """The shared entrypoint's flags, read and validated before torchrun starts any rank (SpecError): a typo
    ends the job in its first seconds with one line, instead of one error per rank after every import."""
    if command[:2] != ["-m", "hpcft.train"] or "--help" in command or "-h" in command:
        return
    from hpcft.train.config import parse_flags

    parse_flags(command[2:])[0].validate()


if __name__ == "__main__":
    sys.exit(main())
