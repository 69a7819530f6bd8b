"""Submission edge: a validated JobSpec goes to Slurm through sbatch (default) or submitit.

Nothing is submitted, and nothing is left on disk, unless every check passes first.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcft.checks import check_deepspeed_json, check_lora_targets
from hpcft.dataformat import check_utf8
from hpcft.distenv import PYTHON_VAR
from hpcft.errors import SpecError
from hpcft.paths import RunPaths, job_dir, slurm_output
from hpcft.render import entry_command, render_sbatch
from hpcft.render_submitit import MAX_TIMEOUTS, submitit_folder, submitit_parameters
from hpcft.resume import check_resume
from hpcft.spec import JobSpec
from hpcft.worldplan import elastic_gaps


@dataclass(frozen=True)
class Submitted:
    job_id: str
    backend: str
    run_dir: Path  # <output_dir>/<name>/<job-id>
    slurm_output: Path


def check_inputs(spec: JobSpec) -> None:
    """Fail before submission on what would only fail later on the cluster."""
    if spec.launch.command:
        return  # a user's own script reads its own inputs
    t = spec.train
    if t.quantization:
        import importlib.util

        if spec.resources.gpus_per_node == 0:
            raise SpecError("train.quantization", f"{t.quantization} (QLoRA/int8) needs GPUs; ask for some with "
                                                  "--gpus-per-node or drop quantization")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SpecError("train.quantization", f"{t.quantization} (QLoRA/int8) needs bitsandbytes and CUDA GPUs; "
                                                  "pip install bitsandbytes, or drop quantization")
    if not (Path(t.model_name) / "config.json").is_file():
        raise SpecError("train.model_name", f"no model directory with config.json at {t.model_name}; "
                                            f"build a small one with: hpcft make-tiny-model {t.model_name}")
    for field, path in (("train.data_path", t.data_path), ("train.eval_data_path", t.eval_data_path),
                        ("train.deepspeed_config", t.deepspeed_config)):
        if path is not None and not Path(path).is_file():
            raise SpecError(field, f"no such file {path}; point it at an existing file")
        if path is not None and not os.access(path, os.R_OK):
            raise SpecError(field, f"{path} is not readable; fix its permissions")
    if t.deepspeed_config:
        check_deepspeed_json(t.deepspeed_config)
    if t.use_peft:
        check_lora_targets(t.model_name, t.lora_target_modules)
    check_resume(spec)
    for field, path in (("train.data_path", t.data_path), ("train.eval_data_path", t.eval_data_path)):
        if path is not None:
            check_utf8(path, field)
    check_data(spec)


def check_before_queue(spec: JobSpec) -> list[str]:
    """Everything the login node can check (inputs, then what the partition has), as submit runs it and
    `--dry-run` too. Returns notes on what could not be checked."""
    check_inputs(spec)
    from hpcft.jobs import nodes

    notes = elastic_notes(spec)
    cluster = nodes()
    check_capacity(spec, cluster)
    if cluster is None:
        notes.append("sinfo did not answer: partition, node count, GPU type, CPUs and memory were not checked")
    return notes


def elastic_notes(spec: JobSpec) -> list[str]:
    """A node range whose global batch a restart on another count of it could not keep: not an error
    (the job may never lose a node), but the user should know before a requeue stops on it."""
    r, t = spec.resources, spec.train
    if not r.nodes.elastic:
        return []
    gaps, fit = elastic_gaps(accum=t.gradient_accumulation_steps, counts=list(r.nodes.counts()))
    if not gaps:
        return []
    a, b = gaps[0]
    return [f"resources.nodes {r.nodes}: a run started on {a} node(s) and requeued onto {b} cannot keep its global "
            f"batch with train.gradient_accumulation_steps {t.gradient_accumulation_steps}, and would stop with an "
            f"error; {fit} keeps it for every node count of the range"]


def check_data(spec: JobSpec) -> None:
    """Parse the data's first examples with the model's tokenizer: a malformed line, a missing column
    or a prompt longer than the context fails here, not minutes later on the cluster."""
    from hpcft.dataformat import TokenizerLoadError, check_data_file, token_counter

    t = spec.train
    source = t.tokenizer_name or t.model_name
    try:
        tokenizer = token_counter(source)
    except TokenizerLoadError as exc:
        raise SpecError("train.tokenizer_name" if t.tokenizer_name else "train.model_name",
                        f"no tokenizer loads from {source} ({exc}); point it at a directory with tokenizer files") from None
    check_data_file(t.data_path, t, tokenizer, field="train.data_path")
    if t.eval_data_path:
        check_data_file(t.eval_data_path, t, tokenizer, field="train.eval_data_path")


def check_capacity(spec: JobSpec, cluster_nodes) -> None:
    """Ask Slurm (sinfo) what the partition has, and refuse a request it can never run with the
    field to change, instead of sbatch's generic refusal. A node range can run once its minimum fits."""
    if cluster_nodes is None:
        return  # sinfo unavailable: sbatch still refuses what cannot run
    r = spec.resources
    part = r.partition or "<default>"
    pool = [n for n in cluster_nodes if part in n.partitions]
    if not pool:
        raise SpecError("resources.partition", f"Slurm has no partition {part!r}; pick one that sinfo lists")
    where = f"partition {r.partition}" if r.partition else "the default partition"
    if r.nodes.min > len(pool):
        raise SpecError("resources.nodes", f"{where} has {len(pool)} node(s); ask for at most {len(pool)} "
                                           f"(got {r.nodes})")
    if r.gpu_type and r.gpus_per_node:
        typed = [n for n in pool if r.gpu_type in n.gpu_types]
        if not typed:
            types = sorted({t for n in pool for t in n.gpu_types})
            fix = (f"GPU types there: {', '.join(types)}; use one of them" if types else
                   f"its nodes list no GPU types; drop the type (gpus_per_node: {r.gpus_per_node})")
            raise SpecError("resources.gpu_type", f"no node in {where} has {r.gpu_type} GPUs ({fix})")
        pool = typed
    max_gpus = max(n.gpus for n in pool)
    if r.gpus_per_node > max_gpus:
        raise SpecError("resources.gpus_per_node", f"nodes in {where} have at most {max_gpus} GPU(s); "
                                                   f"ask for at most {max_gpus} (got {r.gpus_per_node})")
    mem_mb = _mem_mb(r.mem) if r.mem else 0
    max_mem = max(n.mem_mb for n in pool)
    if mem_mb > max_mem > 0:
        raise SpecError("resources.mem", f"nodes in {where} have at most {max_mem} MB; ask for less, or 0 for a "
                                         f"whole node's memory (got {r.mem})")
    fitting = [n for n in pool if n.gpus >= r.gpus_per_node and n.cpus >= r.cpus_per_task]
    if len(fitting) < r.nodes.min:
        max_cpus = max(n.cpus for n in pool)
        raise SpecError("resources.cpus_per_task", f"only {len(fitting)} node(s) in {where} have "
                                                   f"{r.cpus_per_task} CPUs and {r.gpus_per_node} GPUs; nodes have "
                                                   f"at most {max_cpus} CPUs")


def _mem_mb(mem: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    return int(int(mem.rstrip("KMGT")) * units.get(mem[-1], 1))


def sbatch_env() -> dict[str, str]:
    # The job runs ranks with the interpreter that submitted it, even without an activated venv.
    return {**os.environ, PYTHON_VAR: sys.executable}


def submit_sbatch(spec: JobSpec, script: str) -> Submitted:
    out = Path(spec.output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["sbatch", "--parsable"], input=script, text=True, capture_output=True,
                              env=sbatch_env())
    except FileNotFoundError:
        proc = None
    if proc is None or proc.returncode != 0:
        if created:
            out.rmdir()
        why = "sbatch not found; run on a Slurm login node" if proc is None else proc.stderr.strip()
        raise SubmitError(f"sbatch refused the job: {why}")
    job_id = proc.stdout.strip().split(";")[0]
    return Submitted(job_id, "sbatch", job_dir(out, spec.name) / job_id, slurm_output(out, job_id))


class SubmitError(RuntimeError):
    """Slurm refused the job (the message is Slurm's)."""


def submit_submitit(spec: JobSpec) -> Submitted:
    import submitit
    from submitit.core.utils import FailedSubmissionError, UncompletedJobError

    from hpcft.submitit_entry import NodeTask

    folder = submitit_folder(spec)
    made = _first_missing(folder.parent)
    try:
        executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable),
                                          max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as exc:  # submitit's "Could not detect srun"
        raise SubmitError(f"submitit could not submit: {exc}; run on a Slurm login node") from None
    executor.update_parameters(**submitit_parameters(spec))
    task = NodeTask(command=entry_command(spec), job_dir=str(job_dir(spec.output_dir, spec.name)),
                    env=dict(spec.env), rdzv_port=spec.launch.rdzv_port, requeue=spec.launch.requeue)
    try:
        job = executor.submit(task)
    except (UncompletedJobError, FailedSubmissionError, OSError) as exc:  # sbatch refused, failed or is missing
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)  # submitit's pickle and script, in folders made for them
        raise SubmitError(f"submitit could not submit: {exc}") from None
    job_id = str(job.job_id)
    run = RunPaths.for_job(spec.output_dir, spec.name, job_id)
    return Submitted(job_id, "submitit", run.run_dir, run.submitit_log())


def _first_missing(path: Path) -> Path | None:
    """The outermost of path and its parents that does not exist yet (None: path exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            return missing
        missing = p
    return missing


def submit(spec: JobSpec, *, source: str, check: bool = True) -> Submitted:
    """Check (unless check is False: `hpcft submit --no-check`), then submit through the spec's backend."""
    if check:
        check_before_queue(spec)
    if spec.launch.backend == "submitit":
        return submit_submitit(spec)
    return submit_sbatch(spec, render_sbatch(spec, source=source))
