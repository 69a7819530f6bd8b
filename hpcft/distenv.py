"""One environment table: SLURM_* and torchrun variables -> SlurmEnv / DistEnv / Rendezvous, and
the HPCFT_* variables hpcft itself sets and reads.

Nothing else in hpcft spells these names; everything else takes the dataclasses and constants here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from hpcft.hostlist import expand_hostlist

# property -> variables to try, first set wins (step-level values before job-level ones).
SLURM_TABLE: dict[str, tuple[str, ...]] = {
    "job_id": ("SLURM_JOB_ID", "SLURM_JOBID"),
    "job_name": ("SLURM_JOB_NAME",),
    "job_nodelist": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "job_num_nodes": ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
    "step_id": ("SLURM_STEP_ID", "SLURM_STEPID"),
    "step_nodelist": ("SLURM_STEP_NODELIST",),
    "step_num_nodes": ("SLURM_STEP_NUM_NODES",),
    "node_id": ("SLURM_NODEID",),
    "procid": ("SLURM_PROCID",),
    "localid": ("SLURM_LOCALID",),
    "ntasks": ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
    "tasks_per_node": ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
    "gpus_on_node": ("SLURM_GPUS_ON_NODE",),
    "gpus_per_node": ("SLURM_GPUS_PER_NODE",),
    "gpus_per_task": ("SLURM_GPUS_PER_TASK",),
    "step_gpus": ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"),
    "cpus_per_task": ("SLURM_CPUS_PER_TASK",),
    "cpus_on_node": ("SLURM_CPUS_ON_NODE",),
    "restart_count": ("SLURM_RESTART_COUNT",),
}

TORCHRUN_TABLE: dict[str, tuple[str, ...]] = {
    "rank": ("RANK",),
    "world_size": ("WORLD_SIZE",),
    "local_rank": ("LOCAL_RANK",),
    "local_world_size": ("LOCAL_WORLD_SIZE",),
    "group_rank": ("GROUP_RANK",),
    "master_addr": ("MASTER_ADDR",),
    "master_port": ("MASTER_PORT",),
}

# hpcft's own variables: name -> meaning. The constants below are how code refers to them.
RUN_DIR_VAR = "HPCFT_RUN_DIR"
RDZV_PORT_VAR = "HPCFT_RDZV_PORT"
PYTHON_VAR = "HPCFT_PYTHON"
FAULT_SAVE_DELAY_VAR = "HPCFT_FAULT_SAVE_DELAY"
STOP_SIGNAL_VAR = "HPCFT_STOP_SIGNAL"
SAMPLE_LOG_VAR = "HPCFT_SAMPLE_LOG"
FAULT_HANG_VAR = "HPCFT_FAULT_HANG"
FAULT_SLOW_VAR = "HPCFT_FAULT_SLOW"
CPU_NODE_VAR = "HPCFT_CPU_NODE"
STEP_WAIT_VAR = "HPCFT_STEP_WAIT_S"
HPCFT_TABLE: dict[str, str] = {
    CPU_NODE_VAR: "1 on nodes without CUDA, set by the node launcher: a user's script then runs through "
                  "hpcft.cpuworld, so that Accelerate and HF Trainer form one CPU world",
    RUN_DIR_VAR: "the run directory; set by every hpcft launch path, read by the node launcher, rankrun "
                 "(per-rank logs) and the entrypoint (metrics, checkpoints, model)",
    RDZV_PORT_VAR: "a fixed rendezvous port (launch.rdzv_port); unset: derived from the job id",
    STEP_WAIT_VAR: "seconds `hpcft launch` lets Slurm take to place its launchers beside the allocation's "
                   "other steps (srun --immediate) before it says what holds the nodes; default 60",
    PYTHON_VAR: "the interpreter that submitted the job; the batch script runs ranks with it",
    STOP_SIGNAL_VAR: "a signal name (USR2) that also means checkpoint-and-stop, besides USR1; set by the "
                     "submitit task for submitit's own warning signal",
    FAULT_SAVE_DELAY_VAR: "fault injection for tests, STEP:SECONDS: every checkpoint from STEP on pauses "
                          "half-written for SECONDS",
    SAMPLE_LOG_VAR: "for tests, 1: every rank writes the example ids of each optimizer step to "
                    "sample-ids/rank-NNN.jsonl in the run directory",
    FAULT_HANG_VAR: "fault injection for tests, RANK:STEP:SECONDS: that rank sleeps SECONDS inside step STEP "
                    "(in its forward phase), a hang the watchdog must catch and name",
    FAULT_SLOW_VAR: "fault injection for tests, RANK:SECONDS: that rank sleeps SECONDS in the forward phase of "
                    "every optimizer step, a straggler the step statistics must name",
}

# Per-task GPU requests (salloc --ntasks-per-node=4 --gpus-per-task=1) that srun reads back from the
# environment as its own options: the one launcher per node would get one GPU. The launch paths drop them
# and ask for the node's GPUs instead (SlurmEnv.node_launcher_gres).
PER_TASK_GPU_VARS = ("SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK")

# `accelerate launch` always sets this one: how the entrypoint tells it launched the ranks.
ACCELERATE_LAUNCH_VAR = "ACCELERATE_MIXED_PRECISION"

# PyTorch's NCCL flight recorder (a ring buffer of the last collectives per rank), read by ProcessGroupNCCL
# when the process group is created; CUDA only, harmless elsewhere. Each rank's dump goes to PREFIX<rank>.
NCCL_FLIGHT_RECORDER_TABLE: dict[str, str] = {
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # collectives kept per rank (0 turns the recorder off)
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # dump the buffer when a collective times out (timeout_s)
}
NCCL_TRACE_FILE_VAR = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"  # dump path prefix; torch appends the rank


# What hpcft sets for NCCL on CUDA nodes unless the user's environment (or the spec's env) says otherwise.
NCCL_DEFAULTS: dict[str, str] = {
    # A failed or timed-out collective tears the process down instead of leaving the rank hung: torchrun
    # and srun --kill-on-bad-exit then end the job, and hpcft logs names the rank.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # NCCL says which network and transport it chose (a few dozen lines per rank at start, nothing per
    # step), so `hpcft logs` can warn about TCP sockets where InfiniBand exists; NCCL_DEBUG=WARN quiets it.
    "NCCL_DEBUG": "INFO",
    "NCCL_DEBUG_SUBSYS": "INIT,NET",
}
# Printed once in rank 0's log on CUDA, with where each value came from.
NCCL_REPORTED = (*NCCL_DEFAULTS, *NCCL_FLIGHT_RECORDER_TABLE, "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE",
                 "NCCL_P2P_DISABLE", "NCCL_NET_GDR_LEVEL", "NCCL_ALGO", "NCCL_PROTO")


def nccl_env(trace_prefix: str | None) -> dict[str, str]:
    """NCCL_DEFAULTS and the flight recorder's variables (dumps to trace_prefix<rank>): what a CUDA
    node's launcher puts under the user's environment (values the user exported win)."""
    return {**NCCL_DEFAULTS, **(flight_recorder_env(trace_prefix) if trace_prefix else {})}


def nccl_report(env: Mapping[str, str]) -> str:
    """The effective NCCL settings, each marked when it is hpcft's default."""
    parts = []
    for name in NCCL_REPORTED:
        value = env.get(name)
        if value is None:
            continue
        default = NCCL_DEFAULTS.get(name) or NCCL_FLIGHT_RECORDER_TABLE.get(name)
        parts.append(f"{name}={value}" + (" (hpcft default)" if value == default else ""))
    return ", ".join(parts) or "none set"


def flight_recorder_env(trace_prefix: str) -> dict[str, str]:
    """The flight recorder's variables, dumps going to trace_prefix<rank>; values a user exported win."""
    return {**NCCL_FLIGHT_RECORDER_TABLE, NCCL_TRACE_FILE_VAR: trace_prefix}

PORT_BASE, PORT_SPAN = 20000, 20000
JOB_PORTS = range(PORT_BASE, PORT_BASE + PORT_SPAN)  # where job ids' ports lie; fallbacks stay out


def _read(env: Mapping[str, str], table: dict[str, tuple[str, ...]]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for prop, names in table.items():
        out[prop] = next((env[n] for n in names if env.get(n, "") != ""), None)
    return out


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def rdzv_port_for(job_id: str) -> int:
    """A port from the job id: distinct for concurrent jobs, the same on every node of one job."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


@dataclass(frozen=True)
class SlurmEnv:
    job_id: str | None
    job_name: str | None
    job_nodelist: tuple[str, ...]
    job_num_nodes: int
    step_id: str | None
    step_nodelist: tuple[str, ...]
    node_id: int
    procid: int
    localid: int
    ntasks: int
    gpus_on_node: int | None
    cpus_per_task: int | None
    restart_count: int
    node_tasks: int = 1  # the fewest tasks the job has on any node (SLURM_TASKS_PER_NODE "4(x2),3" -> 3)
    gpus_per_task: int | None = None  # the job asked per task (--gpus-per-task=[type:]N)

    @property
    def node_launcher_gres(self) -> str | None:
        """A per-task GPU request turned into the node's GPUs for its one launcher (srun would give it one
        task's worth; Slurm refuses a larger per-task count for a step, so it is asked per node). Inside a
        step (an `srun --pty` shell) the job's per-task request is not in the environment, yet a new step
        inherits it from the job: ask for every GPU the job has on the node (SLURM_GPUS_ON_NODE)."""
        if self.gpus_per_task:
            return f"gpu:{self.gpus_per_task * self.node_tasks}"
        if self.in_step and self.gpus_on_node:
            return f"gpu:{self.gpus_on_node}"
        return None

    @property
    def node_launcher_cpus(self) -> int | None:
        """CPUs for the one launcher per node: all the job's tasks' CPUs there, however they were asked
        for (--ntasks-per-node=4 --cpus-per-task=8 -> 32)."""
        return self.cpus_per_task * self.node_tasks if self.cpus_per_task else None

    @property
    def in_job(self) -> bool:
        return self.job_id is not None

    @property
    def in_step(self) -> bool:
        # The batch script runs as step "batch"/"extern", which is not a step launched by srun.
        return self.step_id is not None and self.step_id.isdigit()

    @property
    def nodes(self) -> tuple[str, ...]:
        """Hosts of the current step when inside one, else of the whole job."""
        return self.step_nodelist if (self.in_step and self.step_nodelist) else self.job_nodelist


def collect_slurm_env(env: Mapping[str, str] | None = None) -> SlurmEnv:
    env = os.environ if env is None else env
    v = _read(env, SLURM_TABLE)
    gpus = _count_gpus(v)
    return SlurmEnv(
        job_id=v["job_id"],
        job_name=v["job_name"],
        job_nodelist=tuple(expand_hostlist(v["job_nodelist"])) if v["job_nodelist"] else (),
        job_num_nodes=_int(v["job_num_nodes"], 1),
        step_id=v["step_id"],
        step_nodelist=tuple(expand_hostlist(v["step_nodelist"])) if v["step_nodelist"] else (),
        node_id=_int(v["node_id"], 0),
        procid=_int(v["procid"], 0),
        localid=_int(v["localid"], 0),
        ntasks=_int(v["ntasks"], 1),
        gpus_on_node=gpus,
        cpus_per_task=_int(v["cpus_per_task"], 0) or None,
        restart_count=_int(v["restart_count"], 0),
        node_tasks=min_tasks_per_node(v["tasks_per_node"]),
        gpus_per_task=_int((v["gpus_per_task"] or "").rpartition(":")[2], 0) or None,
    )


def min_tasks_per_node(value: str | None) -> int:
    """The smallest count in Slurm's compressed per-node task list ("4(x2),3", "1(x64)")."""
    counts = [_int(part.split("(")[0], 1) for part in (value or "").split(",") if part.strip()]
    return max(1, min(counts)) if counts else 1


def _count_gpus(v: dict[str, str | None]) -> int | None:
    if v["gpus_on_node"] is not None:
        return _int(v["gpus_on_node"], 0)
    if v["step_gpus"]:
        return len([g for g in v["step_gpus"].split(",") if g])
    if v["gpus_per_node"]:
        return _int(v["gpus_per_node"].rpartition(":")[2], 0)
    return None


@dataclass(frozen=True)
class Rendezvous:
    """What one node's torchrun needs to find the others."""

    host: str  # first host of the nodelist: runs the c10d store
    port: int
    run_id: str
    nnodes: int
    node_rank: int
    nproc_per_node: int

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def plan_rendezvous(slurm: SlurmEnv, *, cuda_devices: int, port: int | None = None) -> Rendezvous:
    """Rendezvous for one node of a Slurm step: one process per GPU.

    Without CUDA the GPU count Slurm granted becomes the number of CPU processes, so a job asked
    for --gpus-per-node 4 runs 4 ranks per node on any machine.
    """
    if not slurm.in_job:
        raise RuntimeError("not inside a Slurm allocation (SLURM_JOB_ID is unset); use salloc/sbatch or hpcft submit")
    nodes = slurm.nodes or ("localhost",)
    nproc = cuda_devices if cuda_devices > 0 else (slurm.gpus_on_node or 1)
    return Rendezvous(
        host=nodes[0],
        port=port if port is not None else rdzv_port_for(slurm.job_id or "0"),
        run_id=f"hpcft-{slurm.job_id}-{slurm.restart_count}",
        nnodes=len(nodes),
        node_rank=slurm.node_id if len(nodes) > 1 else 0,
        nproc_per_node=max(1, nproc),
    )


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job: from torchrun/accelerate, srun one-task-per-rank, or alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | accelerate | srun | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def collect_dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if env is None else env
    t = _read(env, TORCHRUN_TABLE)
    if t["rank"] is not None and t["world_size"] is not None:
        return DistEnv(
            rank=_int(t["rank"], 0), world_size=_int(t["world_size"], 1),
            local_rank=_int(t["local_rank"], 0), local_world_size=_int(t["local_world_size"], 1),
            node_rank=_int(t["group_rank"], 0), master_addr=t["master_addr"] or "127.0.0.1",
            master_port=_int(t["master_port"], 29500),
            launcher="accelerate" if ACCELERATE_LAUNCH_VAR in env else "torchrun",
        )
    s = collect_slurm_env(env)
    if s.in_step and s.ntasks > 1:
        nodes = s.nodes or ("127.0.0.1",)
        per_node = max(1, s.ntasks // max(1, len(nodes)))
        return DistEnv(
            rank=s.procid, world_size=s.ntasks, local_rank=s.localid, local_world_size=per_node,
            node_rank=s.node_id, master_addr=t["master_addr"] or nodes[0],
            # the job id's own port: no torchrun agent holds it on this path, and +1 would be the next job's
            master_port=_int(t["master_port"], rdzv_port_for(s.job_id or "0")), launcher="srun",
        )
    return DistEnv()
