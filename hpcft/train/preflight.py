"""Preflight checks, run by every rank before training (train.preflight) and by `hpcft doctor` in an
allocation (hpcft.doctor is the thin entrypoint for that). Any mismatch stops the job with one
clear message before a single step.

Checks: world size = nodes x ranks per node; an all-reduce with a known answer (and its time);
LOCAL_RANK < visible GPUs on GPU nodes; the same torch / transformers / hpcft on every rank; the
run directory writable from every node and shared between them.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hpcft.distenv import collect_slurm_env
from hpcft.paths import RunPaths


class PreflightError(RuntimeError):
    """A check failed; the message says what and what to do."""


@dataclass(frozen=True)
class RankFacts:
    rank: int
    host: str
    local_rank: int
    local_world_size: int
    cuda_devices: int
    versions: tuple[tuple[str, str], ...]
    wrote: str | None  # the file this rank wrote into the run directory, or the error
    interface: str = ""  # the socket interface gloo/NCCL use here (the launcher's choice, or the user's)


def versions() -> tuple[tuple[str, str], ...]:
    import transformers

    import hpcft

    return (("torch", torch.__version__), ("transformers", transformers.__version__), ("hpcft", hpcft.__version__))


def check_world(facts: list[RankFacts], *, world_size: int, slurm_nodes: int | None) -> None:
    hosts = sorted({f.host for f in facts})
    per_node = {h: sum(1 for f in facts if f.host == h) for h in hosts}
    if slurm_nodes is not None and len(hosts) != slurm_nodes:
        raise PreflightError(f"world of {world_size} ranks spans {len(hosts)} host(s) {hosts} but Slurm allocated "
                             f"{slurm_nodes} node(s): nodes formed separate worlds or did not join; check the "
                             "rendezvous endpoint and that every node runs one launcher")
    expected = len(hosts) * max(per_node.values())
    if len(set(per_node.values())) != 1 or expected != world_size:
        raise PreflightError(f"world size {world_size} is not nodes x ranks per node ({per_node}); "
                             "every node must start the same number of ranks")


def check_devices(facts: list[RankFacts]) -> None:
    """The rule the entrypoint places ranks by (train.dist.gpu_index), said for the whole world at once."""
    from hpcft.train.dist import DeviceError, gpu_index

    for f in facts:
        if f.cuda_devices:
            try:
                gpu_index(f.local_rank, f.local_world_size, f.cuda_devices)
            except DeviceError as exc:
                raise PreflightError(f"rank {f.rank} on {f.host}: {exc}") from None


def check_versions(facts: list[RankFacts]) -> None:
    first = facts[0]
    for f in facts[1:]:
        if f.versions != first.versions:
            diff = ", ".join(f"{a[0]} {a[1]} vs {b[1]}" for a, b in zip(first.versions, f.versions) if a != b)
            raise PreflightError(f"rank {f.rank} on {f.host} runs different packages than rank 0 on {first.host} "
                                 f"({diff}); install the same environment on every node")


def check_run_dir(facts: list[RankFacts], run_dir: Path) -> None:
    for f in facts:
        if f.wrote is None or f.wrote.startswith("error:"):
            raise PreflightError(f"rank {f.rank} on {f.host} cannot write the run directory {run_dir} "
                                 f"({f.wrote}); use an output_dir on a filesystem every node can write")
        if not Path(f.wrote).exists():
            raise PreflightError(f"file written by rank {f.rank} on {f.host} is not visible from rank 0: {run_dir} "
                                 "is not on a shared filesystem; use an output_dir all nodes share")


def _write_probe(run_dir: Path, rank: int) -> str:
    try:
        probe = RunPaths(run_dir).preflight_probe(rank)
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(socket.gethostname())
        return str(probe)
    except OSError as exc:
        return f"error: {exc}"


def preflight(rt, run_dir: Path, *, env=None) -> str:
    """Run every check on every rank; returns rank 0's one-line report, raises PreflightError."""
    env = os.environ if env is None else env
    facts = RankFacts(rank=rt.env.rank, host=socket.gethostname(), local_rank=rt.env.local_rank,
                      local_world_size=rt.env.local_world_size,
                      cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                      versions=versions(), wrote=_write_probe(run_dir, rt.env.rank),
                      interface=env.get("NCCL_SOCKET_IFNAME" if rt.backend == "nccl" else "GLOO_SOCKET_IFNAME", ""))
    gathered: list = [facts]
    if dist.is_initialized():
        gathered = [None] * rt.env.world_size
        dist.all_gather_object(gathered, facts)
    value = torch.tensor([float(rt.env.rank + 1)], device=rt.device)
    start = time.perf_counter()
    if dist.is_initialized():
        dist.all_reduce(value)
    ms = (time.perf_counter() - start) * 1e3
    n = rt.env.world_size
    if abs(float(value.item()) - n * (n + 1) / 2) > 1e-6:
        raise PreflightError(f"all-reduce returned {value.item()} instead of {n * (n + 1) / 2}: the collective "
                             f"backend ({rt.backend}) is broken between these nodes")
    slurm = collect_slurm_env(env)
    check_world(gathered, world_size=n, slurm_nodes=len(slurm.nodes) if slurm.in_job and slurm.nodes else None)
    check_devices(gathered)
    check_versions(gathered)
    if rt.is_main:
        check_run_dir(gathered, run_dir)
    if dist.is_initialized():
        dist.barrier()
    hosts = sorted({f.host for f in gathered})
    ifaces = sorted({f"{f.host}: {f.interface or 'default'}" for f in gathered})
    return (f"hpcft preflight: ok: {n} rank(s) on {len(hosts)} node(s) {hosts}, all-reduce {ms:.1f} ms, "
            + ", ".join(f"{k} {v}" for k, v in facts.versions) + f", run dir {run_dir} shared, "
            f"rendezvous {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}, {rt.backend} over "
            + "; ".join(ifaces))
