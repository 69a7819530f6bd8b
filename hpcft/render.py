"""Pure render: JobSpec in, sbatch script text out. No environment, clock or subprocess in here.

    print(render_sbatch(load_spec("jobs/samsum_tiny.yaml"), source="jobs/samsum_tiny.yaml"))

Counts (nodes, GPUs, CPUs) are written once, in the #SBATCH header; the launcher reads them back
from Slurm at run time, so `sbatch --nodes=4 script` needs no other edit.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from hpcft.launch import SRUN_FLAGS
from hpcft.distenv import PER_TASK_GPU_VARS, PYTHON_VAR, RDZV_PORT_VAR, RUN_DIR_VAR
from hpcft.paths import REQUEUE_MARKER, data_cache_dir, job_dir, slurm_output_pattern
from hpcft.spec import Container, JobSpec

PYTHON = f'"${{{PYTHON_VAR}:-python3}}"'  # hpcft submit sets it to its own interpreter
TRAIN_MODULE = ("-m", "hpcft.train")


def _sbatch_value(value: str) -> str:
    # sbatch reads #SBATCH lines itself; double quotes keep a value with spaces in one piece.
    return f'"{value}"' if any(c.isspace() for c in value) else value


@dataclass(frozen=True)
class GpuRequest:
    """GPUs per node, as both backends ask Slurm for them."""

    count: int  # GPUs per node
    type: str | None = None  # e.g. "a100": --gpus-per-node=a100:4
    as_gres: bool = False  # --gres=gpu[:type]:N instead of --gpus-per-node (clusters without the latter)

    @property
    def _amount(self) -> str:
        return f"{self.type}:{self.count}" if self.type else str(self.count)

    def sbatch_option(self) -> str:
        return f"--gres=gpu:{self._amount}" if self.as_gres else f"--gpus-per-node={self._amount}"

    def submitit_parameters(self) -> dict[str, int | str]:
        """For submitit.SlurmExecutor.update_parameters; it writes values into #SBATCH lines as given,
        so a typed count reads as in the sbatch render (--gpus-per-node=a100:4)."""
        if self.as_gres:
            return {"gres": f"gpu:{self._amount}"}
        return {"gpus_per_node": self._amount if self.type else self.count}


def gpu_request(spec: JobSpec) -> GpuRequest | None:
    r = spec.resources
    if r.gpus_per_node == 0:
        return None
    return GpuRequest(r.gpus_per_node, r.gpu_type, r.gres)


@dataclass(frozen=True)
class ArrayPlan:
    """A sweep as one job array: task i trains with tasks[i]'s flags in a run directory named by its label."""

    tasks: tuple[tuple[str, tuple[str, ...]], ...]  # (label, python -m hpcft.train flags), by task index
    max_parallel: int | None = None  # Slurm's %K: at most K tasks at a time


def sbatch_options(spec: JobSpec, array: ArrayPlan | None = None) -> list[str]:
    """The #SBATCH options, in a fixed order."""
    r = spec.resources
    opts = [f"--job-name={spec.name}", f"--nodes={r.nodes}"]
    if array is not None:
        throttle = f"%{array.max_parallel}" if array.max_parallel else ""
        opts.append(f"--array=0-{len(array.tasks) - 1}{throttle}")
    if not r.nodes.elastic:
        # With a node range Slurm 22.05 reads --ntasks-per-node as "min nodes x 1 task" and grants only
        # the minimum even when more nodes are idle; without it, one task per node is the default anyway.
        opts.append("--ntasks-per-node=1")
    gpus = gpu_request(spec)
    if gpus:
        opts.append(gpus.sbatch_option())
    opts.append(f"--cpus-per-task={r.cpus_per_task}")
    if r.mem is not None:
        opts.append(f"--mem={r.mem}")
    opts.append(f"--time={r.time}")
    for key in ("partition", "account", "qos", "constraint", "exclude", "nodelist", "reservation"):
        value = getattr(r, key)
        if value is not None:
            opts.append(f"--{key}={value}")
    if r.exclusive:
        opts.append("--exclusive")
    if spec.launch.signal_lead_s:
        # To every process of the job's steps (not the batch shell): ranks checkpoint and stop.
        opts.append(f"--signal=USR1@{spec.launch.signal_lead_s}")
    if spec.launch.requeue:
        opts += ["--requeue", "--open-mode=append"]
    opts.append(f"--output={_sbatch_value(slurm_output_pattern(spec.output_dir, array=array is not None))}")
    return opts


def entry_command(spec: JobSpec) -> list[str]:
    """What each rank runs, as python arguments: the shared entrypoint or the user's own script."""
    if spec.launch.command:
        return list(spec.launch.command)
    return [*TRAIN_MODULE, *spec.train.to_args()]


def render_sbatch(spec: JobSpec, *, source: str = "a job spec", array: ArrayPlan | None = None) -> str:
    lines = [
        "#!/bin/bash",
        f"# hpcft job '{spec.name}', rendered from {source}.",
        "# Edit the spec and re-render (hpcft submit --dry-run SPEC) rather than this file. Counts are",
        "# written only below; the launcher reads nodes and GPUs back from Slurm, so sbatch options",
        "# such as --nodes=4 --gpus-per-node=8 on the command line are all a resize needs.",
        "# Usage: sbatch [--nodes=N --gpus-per-node=G ...] THIS_SCRIPT [extra flags for each rank's command]",
    ]
    lines += [f"#SBATCH {opt}" for opt in sbatch_options(spec, array)]
    lines += ["", "set -eo pipefail"]
    lines += module_lines(spec)
    if spec.launch.setup:
        lines += ["", "# launch.setup from the spec (before set -u: module and activate scripts read unset variables)"]
        lines += list(spec.launch.setup)
    lines += ["set -u", ""]
    run_dir = _quote_value(_literal_path(str(job_dir(spec.output_dir, spec.name))))
    if array is None:
        lines.append(f'export {RUN_DIR_VAR}={run_dir}/"$SLURM_JOB_ID"')
    else:
        lines += sweep_lines(array)
        lines.append(f'export {RUN_DIR_VAR}={run_dir}/"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}-$label"')
    if spec.launch.rdzv_port is not None:
        lines.append(f"export {RDZV_PORT_VAR}={spec.launch.rdzv_port}")
    for name in sorted(spec.env):
        lines.append(f"export {name}={_quote_value(spec.env[name])}")
    lines += [
        f'mkdir -p "${RUN_DIR_VAR}"',
        f'echo "hpcft: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, run directory ${RUN_DIR_VAR}"',
        "",
        "# One launcher per node; it starts torchrun with one rank per GPU (per granted GPU on CPU nodes).",
        "# It holds every GPU and CPU the job has on its node, however they were asked for: srun reads the",
        "# job's task count and per-task GPUs back from the environment (sbatch --ntasks-per-node=4",
        "# --gpus-per-task=1 would start four launchers of one GPU each).",
        "node_tasks=$(printf '%s\\n' ${SLURM_TASKS_PER_NODE//,/ } | sed 's/(.*//' | sort -n | head -n 1)",
        "node_cpus=$(( ${SLURM_CPUS_PER_TASK:-1} * node_tasks ))",
        'node_gpus=""',
        'if [ -n "${SLURM_GPUS_PER_TASK:-}" ]; then node_gpus=$(( ${SLURM_GPUS_PER_TASK##*:} * node_tasks )); fi',
        f"unset {' '.join(PER_TASK_GPU_VARS)}",
    ]
    srun = ["srun", *SRUN_FLAGS, '--nodes="$SLURM_JOB_NUM_NODES"', '--ntasks="$SLURM_JOB_NUM_NODES"',
            '--cpus-per-task="$node_cpus"', '${node_gpus:+--gres=gpu:"$node_gpus"}']
    entry = [*TRAIN_MODULE, '"${args[@]}"'] if array is not None else [shlex.quote(a) for a in entry_command(spec)]
    launcher = ["-m", "hpcft.launch", "--node", "--", *entry, '"$@"']
    container = spec.launch.container
    if container is None:
        cmd = [PYTHON, *launcher]
    elif container.runtime == "pyxis":
        srun += pyxis_flags(container, container_mounts(spec))
        cmd = [shlex.quote(container.python), *launcher]
    else:
        cmd = [*apptainer_prefix(container, container_mounts(spec), gpus=spec.resources.gpus_per_node > 0),
               shlex.quote(container.python), *launcher]
    lines.append("rc=0")
    lines.append(_wrap([*srun, *cmd, "||", "rc=$?"]))
    if spec.launch.requeue:
        lines += [
            "",
            "# Ranks stopped at a checkpoint on Slurm's warning signal: run again from there.",
            f'if [ -f "${RUN_DIR_VAR}/{REQUEUE_MARKER}" ]; then',
            f'  rm -f "${RUN_DIR_VAR}/{REQUEUE_MARKER}"',
            '  echo "hpcft: checkpointed before the time limit; requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines.append('exit "$rc"')
    return "\n".join(lines) + "\n"


# Where `module` comes from when the batch shell (not a login shell) has not defined it.
MODULE_INIT = ("/etc/profile.d/lmod.sh", "/etc/profile.d/modules.sh", "/usr/share/lmod/lmod/init/bash",
               "/usr/share/modules/init/bash")


def module_lines(spec: JobSpec) -> list[str]:
    """launch.modules: `module load` before anything else runs (after `module purge` if asked); the
    module command is set up first where the batch shell lacks it."""
    ln = spec.launch
    if not ln.modules and not ln.module_purge:
        return []
    lines = ["", "# launch.modules from the spec",
             "if ! type module >/dev/null 2>&1; then",
             f"  for f in {' '.join(MODULE_INIT)}; do",
             '    if [ -f "$f" ]; then . "$f"; break; fi',
             "  done",
             "fi"]
    if ln.module_purge:
        lines.append("module purge")
    if ln.modules:
        lines.append(" ".join(["module", "load", *(shlex.quote(m) for m in ln.modules)]))
    return lines


def container_mounts(spec: JobSpec) -> list[str]:
    """The spec's mounts, plus the output directory at its own path when no mount covers it: the ranks
    write the run directory and the data cache there, and the host reads them back."""
    c, out = spec.launch.container, spec.output_dir
    mounts = list(c.mounts)
    covered = any(out == dst or out.startswith(dst.rstrip("/") + "/")
                  for dst in (m.split(":")[1] if ":" in m else m for m in mounts))
    if out.startswith("/") and not covered:
        mounts.append(f"{out}:{out}")
    return mounts


def pyxis_flags(c: Container, mounts: list[str]) -> list[str]:
    """srun options of pyxis (enroot): every node's launcher starts inside the image."""
    flags = [shlex.quote(f"--container-image={c.image}")]
    if mounts:
        flags.append(shlex.quote(f"--container-mounts={','.join(mounts)}"))
    if c.workdir:
        flags.append(shlex.quote(f"--container-workdir={c.workdir}"))
    return flags


def apptainer_prefix(c: Container, mounts: list[str], *, gpus: bool) -> list[str]:
    """`apptainer exec` in front of the launcher: --nv for the host's NVIDIA driver and devices, binds,
    the working directory; the host environment (SLURM_*, the run directory) passes through."""
    words = ["apptainer", "exec"] + (["--nv"] if gpus else [])
    if mounts:
        words += ["--bind", shlex.quote(",".join(mounts))]
    if c.workdir:
        words += ["--pwd", shlex.quote(c.workdir)]
    return words + [shlex.quote(c.image)]


def render_prepare_sbatch(spec: JobSpec, *, source: str = "a job spec") -> str:
    """The data-preparation job of `hpcft submit --prepare`: one CPU task that tokenizes the training
    (and eval) data into the shared cache, so that the training job, queued after it with
    --dependency=afterok, starts on a cache hit."""
    p, r = spec.prepare, spec.resources
    cache = spec.train.data_cache_dir or str(data_cache_dir(spec.output_dir))
    opts = [f"--job-name={spec.name}-prepare", "--nodes=1", "--ntasks=1", f"--cpus-per-task={p.cpus_per_task}"]
    if p.mem is not None:
        opts.append(f"--mem={p.mem}")
    opts.append(f"--time={p.time}")
    for key, value in (("partition", p.partition or r.partition), ("account", r.account), ("qos", r.qos)):
        if value is not None:
            opts.append(f"--{key}={value}")
    opts.append(f"--output={_sbatch_value(slurm_output_pattern(spec.output_dir))}")
    lines = [
        "#!/bin/bash",
        f"# hpcft data preparation for job '{spec.name}', rendered from {source}: tokenizes the data once",
        "# into the shared cache; the training job is queued after it (afterok) and starts on a cache hit.",
    ]
    lines += [f"#SBATCH {opt}" for opt in opts]
    lines += ["", "set -eo pipefail"]
    lines += module_lines(spec)
    if spec.launch.setup:
        lines += ["", "# launch.setup from the spec"] + list(spec.launch.setup)
    lines += ["set -u", ""]
    for name in sorted(spec.env):
        lines.append(f"export {name}={_quote_value(spec.env[name])}")
    cmd = [PYTHON, "-m", "hpcft.prepare", shlex.quote(f"--cache-dir={cache}"), '--num-proc="$SLURM_CPUS_PER_TASK"',
           *(shlex.quote(a) for a in spec.train.to_args())]
    lines.append(_wrap(["exec", *cmd]))
    return "\n".join(lines) + "\n"


def sweep_lines(array: ArrayPlan) -> list[str]:
    """The array task's label and training flags, chosen by SLURM_ARRAY_TASK_ID."""
    lines = ["# The sweep point of this array task: its label (the run directory's name) and its flags.",
             'case "$SLURM_ARRAY_TASK_ID" in']
    for i, (label, args) in enumerate(array.tasks):
        lines.append(_wrap([f"  {i})", f"label={_array_word(label)};", "args=(", *(_array_word(a) for a in args),
                            ");;"]))
    lines += ['  *) echo "hpcft: no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 2;;', "esac"]
    return lines


def _array_word(value: str) -> str:
    """shlex.quote, and quotes around commas too, which bash reads fine but readers (and shellcheck,
    SC2054) take for a mistyped array separator."""
    quoted = shlex.quote(value)
    return f"'{value}'" if quoted == value and "," in value else quoted


def _literal_path(path: str) -> str:
    """A relative path that starts with ~ (a spec rendered before `~` was expanded) as ./~...: the same
    directory, and no reader (or shellcheck) takes the quoted tilde for a home directory."""
    return "./" + path if path.startswith("~") else path


# Words bash reads fine after `X=` but readers (and shellcheck, SC1010) take for syntax: quoted too.
SHELL_WORDS = frozenset("if then else elif fi do done case esac while until for in select function time "
                        "coproc { } ! [[ ]]".split())


def _quote_value(value: str) -> str:
    """shlex.quote, but a value such as '=x' or 'then' gets quotes too (bash reads `X==x` and `X=then`
    fine; readers do not)."""
    quoted = shlex.quote(value)
    return f"'{value}'" if quoted == value and (value.startswith("=") or value in SHELL_WORDS) else quoted


def _wrap(words: list[str], width: int = 100) -> str:
    out, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur + " \\")
            cur = "  " + w
        else:
            cur = f"{cur} {w}" if cur else w
    out.append(cur)
    return "\n".join(out)
