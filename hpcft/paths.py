"""The one owner of path names: run directory, per-rank logs, metrics, checkpoints, model.

    runs/<job-name>/<job-id>/rank-000.log, rank-000.exit.json, metrics.jsonl, checkpoints/, model/
    runs/slurm-<job-id>.out   (the batch script's own output, written by Slurm)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_DIR_ENV = "HPCFT_RUN_DIR"  # set by the batch script / launcher; read by rankrun and the entrypoint
REQUEUE_MARKER = "requeue"  # file name of RunPaths.requeue_marker, for the rendered batch script


def job_dir(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / name


def slurm_output_pattern(output_dir: str) -> str:
    """Slurm's --output pattern for the batch script's own stdout/stderr (%j: job id)."""
    return f"{output_dir.rstrip('/') or '/'}/slurm-%j.out"


def slurm_output(output_dir: str | Path, job_id: str) -> Path:
    return Path(slurm_output_pattern(str(output_dir)).replace("%j", str(job_id)))


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path

    @classmethod
    def for_job(cls, output_dir: str | Path, name: str, job_id: str) -> "RunPaths":
        return cls(job_dir(output_dir, name) / str(job_id))

    def rank_log(self, rank: int) -> Path:
        return self.run_dir / f"rank-{rank:03d}.log"

    def rank_exit(self, rank: int) -> Path:
        return self.run_dir / f"rank-{rank:03d}.exit.json"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def model(self) -> Path:
        return self.run_dir / "model"

    @property
    def spec(self) -> Path:
        return self.run_dir / "spec.yaml"

    @property
    def requeue_marker(self) -> Path:
        """Written by rank 0 after a checkpointed stop on Slurm's warning signal; the batch script
        requeues the job when it finds it."""
        return self.run_dir / REQUEUE_MARKER

    def rank_pid(self, rank: int) -> Path:
        return self.run_dir / f"rank-{rank:03d}.pid"

    @property
    def submitit(self) -> Path:
        return self.run_dir / "submitit"

    def rank_logs(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.run_dir.glob("rank-*.log"):
            try:
                out.append((int(p.stem.split("-")[1]), p))
            except (IndexError, ValueError):
                continue
        return sorted(out)


def find_run_dir(ref: str, output_dir: str | Path = "runs") -> Path | None:
    """A run directory given itself or a job id (searched as <output_dir>/*/<job-id>)."""
    p = Path(ref)
    if p.is_dir():
        return p
    if ref.isdigit() or "_" in ref:
        hits = sorted(Path(output_dir).glob(f"*/{ref}"))
        hits = [h for h in hits if h.is_dir()]
        if hits:
            return hits[0]
    return None
