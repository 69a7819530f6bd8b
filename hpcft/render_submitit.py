"""Pure render for the submitit backend: JobSpec -> submitit.SlurmExecutor parameters, and the sbatch
script that submitit writes for them (what `hpcft submit --dry-run --backend submitit` prints).

    print(render_submitit(load_spec("jobs/samsum_tiny.yaml"), python="python3"))

Resources, the GPU request, the srun flags, the warning's lead (launch.signal_lead_s) and --requeue
are those of render.py. submitit adds its own warning signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL
names another), its log files and the command that runs the pickled NodeTask on every node.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from hpcft.launch import SRUN_FLAGS
from hpcft import paths
from hpcft.render import gpu_request
from hpcft.spec import JobSpec, time_to_minutes

# submitit requeues after at most max_num_timeout time-outs (3 by default). The sbatch path requeues
# after every checkpointed stop, so that a short --time splits a long run into many; so does this one.
MAX_TIMEOUTS = 10_000


def submitit_folder(spec: JobSpec) -> Path:
    """submitit's pickles, scripts and per-task logs (paths.submitit_folder)."""
    return paths.submitit_folder(spec.output_dir, spec.name)


def submitit_parameters(spec: JobSpec) -> dict:
    """Keyword arguments for SlurmExecutor.update_parameters."""
    r = spec.resources
    params: dict = dict(
        job_name=spec.name, nodes=r.nodes.min, ntasks_per_node=1,  # a single count (validate_spec)
        cpus_per_task=r.cpus_per_task,
        time=time_to_minutes(r.time), partition=r.partition, account=r.account, qos=r.qos,
        constraint=r.constraint, mem=r.mem, exclusive=True if r.exclusive else None,
        exclude=r.exclude, nodelist=r.nodelist,
        srun_args=list(SRUN_FLAGS), setup=list(spec.launch.setup) or None,
        # submitit always asks for its signal; with signal_lead_s 0 it comes at the limit itself.
        signal_delay_s=spec.launch.signal_lead_s,
    )
    gpus = gpu_request(spec)
    if gpus:
        params.update(gpus.submitit_parameters())
    extra: dict = {}
    if spec.launch.requeue:
        extra["requeue"] = True  # as in render.py; submitit writes --open-mode=append itself
    if r.reservation:
        extra["reservation"] = r.reservation
    if extra:
        params["additional_parameters"] = extra
    return {k: v for k, v in params.items() if v is not None}


def submitit_command(python: str, folder: str | Path) -> str:
    """The batch script's command, as SlurmExecutor._submitit_command_str writes it."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_submitit(spec: JobSpec, *, python: str) -> str:
    """The script SlurmExecutor would submit for `spec` (python: a shell word, as submit passes it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(spec)
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **submitit_parameters(spec))
