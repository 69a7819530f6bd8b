"""The one owner of path names: every file and directory hpcft writes or reads back.

    <output_dir>/slurm-<job-id>.out                 the batch script's own output (sbatch backend)
    <output_dir>/<name>/submitit/<job-id>/          submitit's pickles and <job-id>_<task>_log.out/err
    <output_dir>/<name>/<job-id>/                   the run directory (RunPaths):
        rank-000.log, rank-000.exit.json, rank-000.pid, rank-000.heartbeat.json, nccl_trace/nccl_trace_rank_0 (CUDA),
        metrics.jsonl, summary.json, metrics.png,
        train_config.json, requeue, refused.txt, .preflight/, tensorboard/, profiler/, model/ (model.tmp/ while written),
        checkpoints/step-00000010/ (step-00000010.tmp/ while written; CheckpointPaths)
    <output_dir>/data-cache/                        tokenized data shared by jobs (DataCachePaths; train.data_cache_dir)
    train.export_dir (train.profiler_dir)           the final model (profiler traces) where the user says, e.g.
                                                    llama-recipes' ROOT/FOLDER-MODEL (recipes_model_dir)
    ${XDG_CACHE_HOME:-~/.cache}/hpcft/              the user's cache: transformers-index-<key>.pickle
                                                    (hpcft.transformers_index)
Rank numbers are written with at least three digits everywhere (rank_tag).
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from hpcft.worldplan import STATE_FILE

REQUEUE_MARKER = "requeue"  # file name of RunPaths.requeue_marker, for the rendered batch script
CHECKPOINT_PREFIX = "step-"
TMP_SUFFIX = ".tmp"


def rank_tag(rank: int) -> str:
    """rank-NNN part of every per-rank file name (more digits past rank 999)."""
    return f"rank-{rank:03d}"


def job_dir(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / name


def slurm_output_pattern(output_dir: str, *, array: bool = False) -> str:
    """Slurm's --output pattern for the batch script's own stdout/stderr (%j: job id; an array task's
    %A_%a: array id and task)."""
    return f"{output_dir.rstrip('/') or '/'}/slurm-{'%A_%a' if array else '%j'}.out"


def slurm_output(output_dir: str | Path, job_id: str) -> Path:
    return Path(slurm_output_pattern(str(output_dir)).replace("%j", str(job_id)))


def submitit_folder(output_dir: str | Path, name: str) -> Path:
    """submitit's folder pattern (%j: job id), beside the job's run directories."""
    return job_dir(output_dir, name) / "submitit" / "%j"


def data_cache_dir(output_dir: str | Path) -> Path:
    """Where tokenized data goes by default (train.data_cache_dir unset): beside the jobs' run directories,
    on the filesystem every node of a job already shares."""
    return Path(output_dir) / "data-cache"


@dataclass(frozen=True)
class DataCachePaths:
    """The tokenized-data cache (hpcft.datacache):

        <root>/<digest>/            a complete entry: meta.json and one save_to_disk directory per split
        <root>/<digest>.lock        held by the one process tokenizing it
        <root>/<digest>.tmp-<who>/  being written; renamed to <digest>/ when complete
        <root>/fingerprints/        content digests of data files, remembered by path, size and mtime
    """

    root: Path
    META = "meta.json"

    def entry(self, digest: str) -> Path:
        return self.root / digest

    def complete(self, digest: str) -> bool:
        return (self.entry(digest) / self.META).is_file()

    def lock(self, digest: str) -> Path:
        return self.root / f"{digest}.lock"

    def staging(self, digest: str, who: str) -> Path:
        return self.root / f"{digest}{TMP_SUFFIX}-{who}"

    @property
    def fingerprints(self) -> Path:
        return self.root / "fingerprints"


def user_cache_dir() -> Path:
    """What hpcft keeps for the user across jobs (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcft"


def transformers_index(key: str) -> Path:
    return user_cache_dir() / f"transformers-index-{key}.pickle"


def recipes_model_dir(root: str, folder: str, model_name: str) -> str:
    """Where llama-recipes' flags put a full FSDP model (--dist_checkpoint_root_folder ROOT
    --dist_checkpoint_folder FOLDER): ROOT/FOLDER-MODEL, model_name as written, so /models/8B makes
    ROOT/FOLDER-/models/8B, nested as llama-recipes nests it."""
    return posixpath.join(root, f"{folder}-{model_name}")


def export_dirs(run: "RunPaths", export_dir: str | None) -> tuple[Path, Path]:
    """Where save_model writes the final model (train.export_dir, default <run>/model), and the sibling it
    is written into first (renamed into place when complete)."""
    target = Path(export_dir) if export_dir else run.model
    return target, target.with_name(target.name + TMP_SUFFIX)


def local_run_dir(stamp: str) -> Path:
    """Run directory of a run started outside any hpcft launch path (plain torchrun or python)."""
    return Path("runs") / "local" / stamp


@dataclass(frozen=True)
class CheckpointPaths:
    """One checkpoint directory (complete, or its .tmp sibling while it is being written)."""

    dir: Path
    zero_tag = "zero"  # DeepSpeed's own checkpoint goes to <dir>/zero/
    universal_tag = "universal"  # <dir>/zero/ converted for another world size (hpcft.train.universal)

    @property
    def state(self) -> Path:
        """trainer_state.json (hpcft.worldplan.SavedRun): position and the shape of the run that wrote it;
        written last, so its presence means complete."""
        return self.dir / STATE_FILE

    @property
    def dcp(self) -> Path:
        return self.dir / "dcp"

    @property
    def universal(self) -> Path:
        """DeepSpeed's universal checkpoint made from zero/ when resuming on another DP world size
        (universal.tmp/ while it is converted)."""
        return self.dir / self.universal_tag

    @property
    def universal_tmp(self) -> Path:
        return self.dir / (self.universal_tag + TMP_SUFFIX)

    @property
    def engine_extra(self) -> Path:
        """Scheduler and loss-scaler state of torch engines."""
        return self.dir / "engine.pt"

    def rng(self, rank: int) -> Path:
        return self.dir / f"rng-{rank_tag(rank)}.pt"

    @property
    def step(self) -> int:
        return int(self.dir.name[len(CHECKPOINT_PREFIX):].removesuffix(TMP_SUFFIX))

    @property
    def tmp(self) -> "CheckpointPaths":
        return CheckpointPaths(self.dir.with_name(self.dir.name + TMP_SUFFIX))


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path

    @classmethod
    def for_job(cls, output_dir: str | Path, name: str, job_id: str) -> "RunPaths":
        return cls(job_dir(output_dir, name) / str(job_id))

    def rank_log(self, rank: int) -> Path:
        return self.run_dir / f"{rank_tag(rank)}.log"

    def rank_exit(self, rank: int) -> Path:
        return self.run_dir / f"{rank_tag(rank)}.exit.json"

    def rank_pid(self, rank: int) -> Path:
        return self.run_dir / f"{rank_tag(rank)}.pid"

    def rank_heartbeat(self, rank: int) -> Path:
        """Where the rank's watchdog leaves its last progress (step, phase, time, host, pid) every few seconds."""
        return self.run_dir / f"{rank_tag(rank)}.heartbeat.json"

    def rank_heartbeats(self) -> list[Path]:
        return sorted(self.run_dir.glob("rank-*.heartbeat.json"))

    @property
    def nccl_trace_prefix(self) -> str:
        """PyTorch's NCCL flight recorder writes each rank's dump to this prefix + the rank number."""
        return str(self.run_dir / "nccl_trace" / "nccl_trace_rank_")

    def rank_exits(self) -> list[Path]:
        return sorted(self.run_dir.glob("rank-*.exit.json"))

    def sample_ids(self, rank: int) -> Path:
        """Test-only (SAMPLE_LOG_VAR): the example ids each optimizer step of this rank trained on."""
        return self.run_dir / "sample-ids" / f"{rank_tag(rank)}.jsonl"

    def rendezvous_port(self, key: str) -> Path:
        """Where the head node's launcher publishes the rendezvous port of one launch (key: job id,
        restart count and step id, so a requeue or a second `hpcft launch` never reads an old one)."""
        return self.run_dir / ".rendezvous" / f"{key}.json"

    def launcher_left(self, key: str, node_rank: int) -> Path:
        """Written by a node's launcher once its torchrun exited, for the head node, which hosts the
        rendezvous store and leaves last (hpcft.rdzvstore)."""
        return self.run_dir / ".rendezvous" / f"{key}.left" / f"node{node_rank}"

    def preflight_probe(self, rank: int) -> Path:
        """The file each rank writes to show the run directory is shared and writable."""
        return self.run_dir / ".preflight" / rank_tag(rank)

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def metrics_plot(self) -> Path:
        return self.run_dir / "metrics.png"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def spec(self) -> Path:
        """The job spec as hpcft submit resolved it (JSON), written into the run directory at submission."""
        return self.run_dir / "spec.json"

    @property
    def train_config(self) -> Path:
        return self.run_dir / "train_config.json"

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / "tensorboard"

    @property
    def profiler(self) -> Path:
        return self.run_dir / "profiler"

    @property
    def model(self) -> Path:
        return self.run_dir / "model"

    @property
    def model_tmp(self) -> Path:
        return self.run_dir / ("model" + TMP_SUFFIX)

    @property
    def refused(self) -> Path:
        """The one-line error of a job whose training flags the node launcher refused before any rank
        started (`hpcft logs` shows it as the job's failure)."""
        return self.run_dir / "refused.txt"

    @property
    def requeue_marker(self) -> Path:
        """Written by rank 0 after a checkpointed stop on Slurm's warning signal; the batch script
        requeues the job when it finds it."""
        return self.run_dir / REQUEUE_MARKER

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint(self, step: int) -> CheckpointPaths:
        return CheckpointPaths(self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}")

    def checkpoint_dirs(self) -> list[CheckpointPaths]:
        """Checkpoint directories that are not being written (complete ones also have their state file)."""
        return [CheckpointPaths(p) for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*")
                if not p.name.endswith(TMP_SUFFIX)]

    @property
    def data_cache(self) -> Path:
        """The default tokenized-data cache of the job's output directory (<output_dir>/<name>/<job-id>)."""
        return data_cache_dir(self.run_dir.parent.parent)

    def sibling_runs(self) -> list["RunPaths"]:
        """Every run directory of the same job name (this one included)."""
        return [RunPaths(p) for p in self.run_dir.parent.glob("*") if p.is_dir()]

    @property
    def submitit(self) -> Path:
        """Where submitit writes this job's pickles and task logs (see submitit_folder)."""
        return self.run_dir.parent / "submitit" / self.run_dir.name

    def submitit_log(self, task: int = 0) -> Path:
        return self.submitit / f"{self.run_dir.name}_{task}_log.out"

    @property
    def job_id(self) -> str:
        """The Slurm job id the directory is named by (a sweep task's: <array-id>_<task>, before its label)."""
        return self.run_dir.name.split("-", 1)[0]

    def job_output(self, output_dir: str | Path) -> Path:
        """The job's own output: sbatch's slurm-<id>.out, or submitit's first task log."""
        sbatch = slurm_output(output_dir, self.job_id)
        return sbatch if sbatch.exists() or not self.submitit_log().exists() else self.submitit_log()

    def rank_logs(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.run_dir.glob("rank-*.log"):
            try:
                out.append((int(p.stem.split("-")[1]), p))
            except (IndexError, ValueError):
                continue
        return sorted(out)


def launch_run_dir(output_dir: str | Path, name: str, job_id: str) -> Path:
    """The run directory of one `hpcft launch` in an allocation: <output_dir>/<name>/<job-id>, and for a
    second launch in the same allocation <job-id>-2, -3, ... (a new run each time, not a resume of the
    previous one; find_run_dir(<job-id>) finds the first)."""
    first = RunPaths.for_job(output_dir, name, job_id).run_dir
    candidate, n = first, 1
    while candidate.exists():
        n += 1
        candidate = first.with_name(f"{job_id}-{n}")
    return candidate


def find_run_dir(ref: str, output_dir: str | Path = "runs") -> Path | None:
    """A run directory given itself or a job id (searched as <output_dir>/*/<job-id>, and a sweep task's
    <output_dir>/*/<array-id>_<task>-<label>)."""
    p = Path(ref)
    if p.is_dir():
        return p
    if ref.isdigit() or "_" in ref:
        hits = sorted(Path(output_dir).glob(f"*/{ref}")) + sorted(Path(output_dir).glob(f"*/{ref}-*"))
        hits = [h for h in hits if h.is_dir()]
        if hits:
            return hits[0]
    return None


def sweep_task_dir(output_dir: str | Path, name: str, array_id: str, task: int, label: str) -> Path:
    """A sweep task's run directory: <output_dir>/<name>/<array-id>_<task>-<label> (the label names its
    overrides, e.g. lr=1e-4,lora_r=8)."""
    return job_dir(output_dir, name) / f"{array_id}_{task}-{label}"


def sweep_task_dir_pattern(output_dir: str, name: str, label_var: str) -> str:
    """The same, as the batch script writes it from Slurm's variables (label_var holds the label)."""
    return f"{job_dir(output_dir, name)}/" + '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}-${' + label_var + '}"'


def sweep_manifest(output_dir: str | Path, name: str, array_id: str) -> Path:
    """What a sweep submitted: its points, their overrides and labels (hpcft sweep-report reads it)."""
    return job_dir(output_dir, name) / f"{array_id}.sweep.json"


def sweep_plot(output_dir: str | Path, name: str, array_id: str) -> Path:
    return job_dir(output_dir, name) / f"{array_id}.sweep.png"


def find_sweep_manifest(job: str, output_dir: str | Path = "runs") -> Path | None:
    hits = sorted(Path(output_dir).glob(f"*/{job}.sweep.json"))
    return hits[0] if hits else None
