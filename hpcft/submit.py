"""Submission edge: a validated JobSpec goes to Slurm through sbatch (default) or submitit.

Nothing is submitted, and nothing is left on disk, unless every check passes first.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcft.checks import check_deepspeed_json, check_export_dir, check_lora_targets
from hpcft.distenv import PYTHON_VAR
from hpcft.errors import SpecError
from hpcft.paths import RunPaths, job_dir, slurm_output
from hpcft.render import entry_command, render_prepare_sbatch, render_sbatch
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
    prepare_job_id: str | None = None  # the data-preparation job it waits for (hpcft submit --prepare)
    dependencies: tuple[str, ...] = ()  # Slurm dependencies it waits for: afterok:123, afterany:456


def check_inputs(spec: JobSpec) -> None:
    """Fail before submission on what would only fail later on the cluster."""
    if spec.launch.command:
        return  # a user's own script reads its own inputs
    t = spec.train
    if t.quantization:
        if spec.resources.gpus_per_node == 0:
            raise SpecError("train.quantization", f"{t.quantization} (QLoRA/int8) needs GPUs; ask for some with "
                                                  "--gpus-per-node or drop quantization")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SpecError("train.quantization", f"{t.quantization} (QLoRA/int8) needs bitsandbytes and CUDA GPUs; "
                                                  "pip install bitsandbytes, or drop quantization")
    if not (Path(t.model_name) / "config.json").is_file():
        raise SpecError("train.model_name", f"no model directory with config.json at {t.model_name}; "
                                            f"build a small one with: hpcft make-tiny-model {t.model_name}")
    for tracker in t.trackers:
        if tracker != "tensorboard" and importlib.util.find_spec(tracker) is None:
            raise SpecError("train.report_to", f"{tracker} is not installed here: pip install "
                                               f"{'mlflow-skinny' if tracker == 'mlflow' else tracker}, or drop it")
    if t.deepspeed_config is not None:
        if not Path(t.deepspeed_config).is_file():
            raise SpecError("train.deepspeed_config", f"no such file {t.deepspeed_config}; point it at an existing file")
        check_deepspeed_json(t.deepspeed_config)
    if t.use_peft:
        check_lora_targets(t.model_name, t.lora_target_modules)
    check_export_dir(t.export_dir if t.save_model else None)
    check_resume(spec)
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


def data_sources(t) -> list[tuple[str, str]]:
    """(field, path) of the data a job reads itself; a custom loader reads what it likes."""
    sources = [] if t.dataset == "custom" else [("train.data_path", t.data_path)]
    return sources + ([("train.eval_data_path", t.eval_data_path)] if t.eval_data_path else [])


def check_data(spec: JobSpec, preview_rows: int = 2000) -> None:
    """Read the data as the job will (every file decodes as UTF-8; the first examples through the
    same readers) and check them against the model's tokenizer: a missing file, a malformed line, a
    missing column, chat data without a chat template or a prompt longer than the context fails here,
    not after the queue."""
    from hpcft.dataformat import (TokenizerLoadError, check_custom_dataset, check_data_rows, check_utf8,
                                  token_counter)
    from hpcft.datasource import describe, preview

    t = spec.train
    if t.dataset == "custom":
        check_custom_dataset(t.custom_dataset)
    sources = []
    for field, path in data_sources(t):
        src = describe(path, field)
        for f in src.files:
            if not os.access(f, os.R_OK):
                raise SpecError(field, f"{f} is not readable; fix its permissions")
        for f in src.text_files:
            check_utf8(f, field)
        sources.append((field, src))
    if not sources:
        return
    name = t.tokenizer_name or t.model_name
    try:
        tokenizer = token_counter(name)
    except TokenizerLoadError as exc:
        raise SpecError("train.tokenizer_name" if t.tokenizer_name else "train.model_name",
                        f"no tokenizer loads from {name} ({exc}); point it at a directory with tokenizer files") from None
    for field, src in sources:
        rows, columns = preview(src, preview_rows, field)
        check_data_rows(rows, columns, t, tokenizer, field=field, source=src.path)


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


DEPENDENCY_TYPES = ("afterok", "afterany", "afternotok")
_AFTER = re.compile(r"^(\d+(?:_\d+)?)(?::([a-z]+))?$")


def parse_after(values: list[str] | tuple[str, ...], *, known=None) -> list[str]:
    """`--after JOB[:afterok|afterany|afternotok]` (repeatable) -> Slurm dependencies ("afterok:123"),
    each job checked against Slurm when it answers (known: job id -> bool, for tests)."""
    deps = []
    for value in values:
        m = _AFTER.match(value.strip())
        if m is None or (m.group(2) or "afterok") not in DEPENDENCY_TYPES:
            raise SpecError("--after", f"write JOB or JOB:{'|'.join(DEPENDENCY_TYPES)}, e.g. 1234 or 1234:afterany "
                                       f"(got {value!r})")
        job, kind = m.group(1), m.group(2) or "afterok"
        if not (known or _slurm_knows)(job):
            raise SpecError("--after", f"Slurm knows no job {job}; check the id with hpcft status")
        deps.append(f"{kind}:{job}")
    return deps


def _slurm_knows(job: str) -> bool:
    from hpcft.jobs import SlurmUnavailable, job_info

    try:
        return job_info(job) is not None
    except SlurmUnavailable:
        return True  # nothing to ask here; sbatch refuses a dependency on a job it does not know


def dependency_args(deps: list[str] | tuple[str, ...]) -> list[str]:
    """sbatch options that hold a job until its dependencies are met, and cancel it when one never can
    be (a failed afterok job): Slurm would otherwise leave it pending forever (DependencyNeverSatisfied)."""
    return [f"--dependency={','.join(deps)}", "--kill-on-invalid-dep=yes"] if deps else []


def _sbatch(spec: JobSpec, script: str, options: list[str]) -> str:
    """sbatch the script; the job id. Nothing is left behind when Slurm refuses it."""
    out = Path(spec.output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["sbatch", "--parsable", *options], input=script, text=True, capture_output=True,
                              env=sbatch_env())
    except FileNotFoundError:
        proc = None
    if proc is None or proc.returncode != 0:
        if created:
            out.rmdir()
        why = "sbatch not found; run on a Slurm login node" if proc is None else proc.stderr.strip()
        raise SubmitError(f"sbatch refused the job: {why}")
    return proc.stdout.strip().split(";")[0]


def submit_sbatch(spec: JobSpec, script: str, *, deps: tuple[str, ...] = ()) -> Submitted:
    out = Path(spec.output_dir)
    job_id = _sbatch(spec, script, dependency_args(deps))
    return Submitted(job_id, "sbatch", job_dir(out, spec.name) / job_id, slurm_output(out, job_id), None, deps)


def submit_sweep(points, *, source: str, max_parallel: int | None, check: bool = True,
                 after: list[str] | tuple[str, ...] = ()) -> tuple[str, Path]:
    """One job array for a sweep's points (hpcft.sweep.grid, paths resolved): every distinct point
    checked first, then sbatch; returns the array's job id and its manifest (hpcft sweep-report)."""
    import json

    from hpcft.paths import sweep_manifest
    from hpcft.render import ArrayPlan

    if check:
        seen: set[tuple[str, ...]] = set()
        for point in points:
            key = tuple(point.train_args)
            if key not in seen:
                seen.add(key)
                check_before_queue(point.spec)
    spec = points[0].spec  # resources, launch and env are the same for every point
    plan = ArrayPlan(tuple((p.label, tuple(p.train_args)) for p in points), max_parallel)
    job_id = _sbatch(spec, render_sbatch(spec, source=source, array=plan), dependency_args(after))
    from hpcft.sweep import manifest

    path = sweep_manifest(spec.output_dir, spec.name, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {k: [] for k, _ in points[0].overrides}
    for p in points:
        for k, v in p.overrides:
            if v not in axes[k]:
                axes[k].append(v)
    path.write_text(json.dumps(manifest(job_id, source, axes, points), indent=1) + "\n")
    from hpcft.paths import sweep_task_dir

    for p in points:
        write_spec(p.spec, sweep_task_dir(spec.output_dir, spec.name, job_id, p.index, p.label))
    return job_id, path


def submit_prepare(spec: JobSpec, *, source: str) -> str:
    """Queue the data-preparation job (render_prepare_sbatch); its job id."""
    return _sbatch(spec, render_prepare_sbatch(spec, source=source), [])


class SubmitError(RuntimeError):
    """Slurm refused the job (the message is Slurm's)."""


def submit_submitit(spec: JobSpec, *, deps: tuple[str, ...] = ()) -> Submitted:
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
    params = submitit_parameters(spec)
    if deps:  # dependency_args, as submitit writes #SBATCH lines from a dict
        params["additional_parameters"] = {**params.get("additional_parameters", {}),
                                           "dependency": ",".join(deps), "kill-on-invalid-dep": "yes"}
    executor.update_parameters(**params)
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
    return Submitted(job_id, "submitit", run.run_dir, run.submitit_log(), None, deps)


def _first_missing(path: Path) -> Path | None:
    """The outermost of path and its parents that does not exist yet (None: path exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            return missing
        missing = p
    return missing


def submit(spec: JobSpec, *, source: str, check: bool = True, prepare: bool = False,
           after: list[str] | tuple[str, ...] = ()) -> Submitted:
    """Check (unless check is False: `hpcft submit --no-check`), then submit through the spec's backend,
    held until the jobs of `after` (parse_after) allow; with prepare, the data-preparation job first and
    the training job after it (afterok)."""
    if check:
        check_before_queue(spec)
    prep = submit_prepare(spec, source=source) if prepare else None
    deps = (*after, *([f"afterok:{prep}"] if prep else []))
    try:
        if spec.launch.backend == "submitit":
            sub = submit_submitit(spec, deps=deps)
        else:
            sub = submit_sbatch(spec, render_sbatch(spec, source=source), deps=deps)
    except SubmitError:
        if prep:  # no training job: its preparation is not wanted either
            subprocess.run(["scancel", prep], capture_output=True)
        raise
    write_spec(spec, sub.run_dir)
    return dataclasses.replace(sub, prepare_job_id=prep)


def write_spec(spec: JobSpec, run_dir: Path) -> None:
    """The resolved spec into the job's run directory: what the run was asked to be (its trackers log
    it as parameters). Best effort: the job is queued already."""
    import json

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        RunPaths(run_dir).spec.write_text(json.dumps(dataclasses.asdict(spec), indent=1, default=str) + "\n")
    except OSError:
        pass
