"""squeue / scontrol / sacct / scancel, read back into plain data for `hpcft status|cancel|submit --wait`."""
from __future__ import annotations

import dataclasses
import subprocess
import time
from dataclasses import dataclass

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}
SQUEUE_FIELDS = ("JobID", "Name", "State", "Elapsed", "TimeLimit", "Nodes", "NodeList (Reason)")
SQUEUE_FORMAT = "%i|%j|%T|%M|%l|%D|%R"


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    name: str
    state: str
    elapsed: str
    time_limit: str
    nodes: str
    reason: str  # nodelist when running, why it waits when pending
    exit_code: str = ""
    restarts: str = ""  # times Slurm requeued it (time limit, node failure, hpcft's own requeue)


class SlurmUnavailable(RuntimeError):
    """A Slurm command is not installed here (not a login node)."""


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SlurmUnavailable(f"{argv[0]} not found; run on a Slurm login node "
                               "(or start the local cluster: bash envs/local-cluster.sh up)") from None


def queue(job_ids: list[str] | None = None) -> list[JobInfo]:
    argv = ["squeue", "-h", "-o", SQUEUE_FORMAT]
    if job_ids:
        argv += ["-j", ",".join(job_ids)]
    proc = _run(argv)
    if proc.returncode != 0:
        return []
    rows = [JobInfo(*line.split("|", 6)) for line in proc.stdout.splitlines() if line.count("|") >= 6]
    restarts = _restart_counts()
    return [dataclasses.replace(r, restarts=restarts.get(r.job_id, "")) for r in rows]


def _restart_counts() -> dict[str, str]:
    """job id -> Restarts, for every job slurmctld knows, in one call (squeue cannot show it)."""
    proc = _run(["scontrol", "-o", "show", "job"])
    if proc.returncode != 0:
        return {}
    jobs = (parse_scontrol(line) for line in proc.stdout.splitlines())
    return {d["JobId"]: d.get("Restarts", "") for d in jobs if "JobId" in d}


def parse_scontrol(text: str) -> dict[str, str]:
    out = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


def job_info(job_id: str) -> JobInfo | None:
    """A job's state, whether it is still queued or recently finished (scontrol, then sacct)."""
    proc = _run(["scontrol", "-o", "show", "job", job_id])
    if proc.returncode == 0 and proc.stdout.strip():
        d = parse_scontrol(proc.stdout.splitlines()[0])
        return JobInfo(job_id, d.get("JobName", ""), d.get("JobState", "UNKNOWN"), d.get("RunTime", ""),
                       d.get("TimeLimit", ""), d.get("NumNodes", ""), d.get("NodeList", "") or d.get("Reason", ""),
                       d.get("ExitCode", ""), d.get("Restarts", ""))
    proc = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,JobName,State,Elapsed,Timelimit,NNodes,NodeList,ExitCode"])
    if proc.returncode == 0 and proc.stdout.strip():
        f = proc.stdout.splitlines()[0].split("|")
        return JobInfo(f[0], f[1], f[2].split()[0], f[3], f[4], f[5], f[6], f[7])
    return None


def wait_for(job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> JobInfo | None:
    start = time.monotonic()
    while True:
        info = job_info(job_id)
        if info is not None and info.state.split()[0] in TERMINAL:
            return info
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return info
        time.sleep(poll_s)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    cpus: int
    gpus: int
    mem_mb: int
    partitions: tuple[str, ...]
    state: str
    gpu_types: tuple[str, ...] = ()  # typed GPUs in its gres (a100 of gpu:a100:4); untyped gres has none


def parse_gres_types(gres: str) -> tuple[str, ...]:
    """'gpu:a100:2(S:0),gpu:v100:2' -> ('a100', 'v100'); 'gpu:4' -> ()."""
    types = []
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) == 3 and parts[1] not in types:
            types.append(parts[1])
    return tuple(types)


def parse_gres_gpus(gres: str) -> int:
    """'gpu:4', 'gpu:a100:4(S:0-1)', 'gpu:a100:2,gpu:v100:2' -> GPU count."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def nodes() -> list[NodeInfo] | None:
    """The cluster's nodes as sinfo reports them; None when sinfo cannot be asked."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%c|%G|%P|%T|%m"], capture_output=True, text=True,
                              timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    by_name: dict[str, NodeInfo] = {}
    for line in proc.stdout.splitlines():
        f = line.split("|")
        if len(f) != 6 or not f[1].isdigit():
            continue
        old = by_name.get(f[0])
        parts = (old.partitions if old else ()) + (f[3].rstrip("*"),) + (("<default>",) if f[3].endswith("*") else ())
        mem = int(f[5]) if f[5].isdigit() else 0
        by_name[f[0]] = NodeInfo(f[0], int(f[1]), parse_gres_gpus(f[2]), mem, parts, f[4], parse_gres_types(f[2]))
    return list(by_name.values())


def running_steps(job_id: str) -> list[str]:
    """The job's steps that hold resources now, as "ID (name)": what keeps another step from starting.
    Empty when squeue cannot say."""
    try:
        proc = _run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i|%j"])
    except (SlurmUnavailable, subprocess.TimeoutExpired):
        return []
    steps = [line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line]
    return [f"{sid} ({name})" for sid, name in steps if name not in ("extern", "batch")
            and not sid.endswith((".extern", ".batch"))]


def cancel(job_ids: list[str]) -> subprocess.CompletedProcess:
    return _run(["scancel", *job_ids])
