"""hpcft command line: parse, delegate, print. Logic lives in the modules it calls.

    hpcft submit --nodes 2 --gpus-per-node 4 jobs/samsum_tiny.yaml train.lr=3e-4
    hpcft submit --dry-run jobs/samsum_tiny.yaml           # print the script, submit nothing
    hpcft launch -- -m hpcft.train --max_train_step=20     # inside salloc / srun --pty
    hpcft logs <job-id|run-dir> [--stats]  |  hpcft status [job-id]  |  hpcft cancel <job-id>
    hpcft runs [NAME]                                      # a table of past runs
    hpcft sweep jobs/SPEC.yaml train.lr=1e-4,3e-4 train.lora_r=8,16 --max-parallel 2   # one job array
    hpcft sweep-report <array-job-id>
    hpcft make-tiny-model artifacts/tiny-llama
    hpcft doctor                                           # inside salloc: preflight checks on every rank
    hpcft prepare jobs/samsum_tiny.yaml                    # tokenize the job's data into the shared cache
    hpcft submit --prepare jobs/samsum_tiny.yaml           # ... as its own CPU job; training waits for it
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcft.errors import SpecError
from hpcft.tiny_families import FAMILIES

# CLI flag -> dotted spec key; the flags users type most, everything else via key=value.
FLAG_KEYS = {
    "nodes": "resources.nodes", "gpus_per_node": "resources.gpus_per_node",
    "cpus_per_task": "resources.cpus_per_task", "time": "resources.time", "mem": "resources.mem",
    "partition": "resources.partition", "account": "resources.account", "qos": "resources.qos",
    "constraint": "resources.constraint", "exclude": "resources.exclude", "nodelist": "resources.nodelist",
    "reservation": "resources.reservation", "job_name": "name", "output_dir": "output_dir",
    "backend": "launch.backend",
}
FLAG_HELP = {
    "nodes": "nodes: a count, or an elastic range MIN-MAX (e.g. 2-4) that Slurm may start on any count in",
    "gpus_per_node": "GPUs per node (COUNT or TYPE:COUNT, e.g. a100:4); CPU ranks per node where there is no CUDA",
    "cpus_per_task": "CPUs of each node's one launcher task, shared by its ranks",
    "time": "wall-clock limit: MM, HH:MM:SS or D-HH:MM:SS",
    "mem": "memory per node as Slurm writes it (64G; 0 for all of it)",
    "partition": "Slurm partition", "account": "Slurm account to charge", "qos": "Slurm quality of service",
    "constraint": "node features, e.g. 'a100&ib'",
    "exclude": "nodes never to use, a Slurm hostlist such as gpu[07-08]",
    "nodelist": "nodes the job must include, a Slurm hostlist",
    "reservation": "run inside this Slurm reservation",
    "job_name": "the job's name (also its run directories' parent: OUTPUT_DIR/NAME/JOB_ID)",
    "output_dir": "where run directories and the data cache go (default: the spec's, runs)",
    "backend": "sbatch (a rendered script) or submitit",
}


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    from hpcft import commands

    p = argparse.ArgumentParser(prog="hpcft", description="Slurm-aware LLM fine-tuning.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("submit", help="render a job spec into an sbatch script and submit it",
                       description="Check the job on the login node, render it and submit it. Bad input (spec "
                                   "fields, duplicate keys, Slurm times, missing model or data, non-UTF-8 or malformed "
                                   "data, DeepSpeed JSON, LoRA targets, resume checkpoint, partition capacity and GPU "
                                   "type) is one line naming the field, exit status 2, nothing submitted.")
    s.add_argument("spec", nargs="?", help="YAML job spec (default: built-in defaults)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    for flag in FLAG_KEYS:
        s.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar=flag.upper(), help=FLAG_HELP.get(flag))
    s.add_argument("--dry-run", action="store_true",
                   help="run every check, then print the script that would be submitted instead of submitting it")
    s.add_argument("--no-check", action="store_true",
                   help="skip the login-node checks (model, data, DeepSpeed JSON, resume checkpoint, LoRA targets, "
                        "sinfo capacity and GPU type), e.g. to render on a machine without the model")
    s.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it failed")
    s.add_argument("--after", action="append", default=[], metavar="JOB[:TYPE]",
                   help="start only after Slurm job JOB ended (TYPE afterok, the default: succeeded; afterany: "
                        "ended any way; afternotok: failed); repeatable. A dependency that can never be met "
                        "cancels this job instead of leaving it queued")
    s.add_argument("--parsable", action="store_true",
                   help="print only the job id, as sbatch --parsable does (jid=$(hpcft submit --parsable ...))")
    s.add_argument("--prepare", action="store_true",
                   help="first queue a CPU job that tokenizes the data into the shared cache (the spec's prepare: "
                        "section), and queue training after it (afterok), so GPU nodes never wait on tokenizing")
    s.set_defaults(func=commands.submit)

    pr = sub.add_parser("prepare", help="tokenize a job's data into the shared cache, here and now",
                        description="Tokenize the spec's data (train and eval) once into <output_dir>/data-cache "
                                    "(or train.data_cache_dir), keyed by the content of the data, the tokenizer, the "
                                    "form, the chat template and the context length; jobs on the same inputs then "
                                    "start on a cache hit. Bad data is one line naming the field, exit status 2.")
    pr.add_argument("spec", nargs="?", help="YAML job spec (default: built-in defaults)")
    pr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.context_length=1024")
    pr.add_argument("--output-dir", dest="output_dir", metavar="OUTPUT_DIR", help="the spec's output_dir")
    pr.add_argument("--num-proc", type=int, default=0, help="tokenizing processes (default: every CPU here)")
    pr.add_argument("--rebuild", action="store_true", help="tokenize again even when the cache has the data")
    pr.set_defaults(func=commands.prepare)

    la = sub.add_parser("launch", help="start all ranks inside an allocation (salloc / srun --pty)")
    la.add_argument("--output-dir", default="runs", help="parent of the run directory (default: runs)")
    la.add_argument("--name", default="interactive", help="run directory: <output-dir>/<name>/<job-id>")
    la.set_defaults(func=commands.launch)

    d = sub.add_parser("doctor", help="preflight checks on every rank of the current allocation")
    d.add_argument("--output-dir", default="runs", help="where the doctor's run directory goes (default: runs)")
    d.set_defaults(func=commands.doctor)

    lg = sub.add_parser("logs", help="the job's output, then every rank's log, and the first rank that failed")
    lg.add_argument("ref", help="job id or run directory")
    lg.add_argument("--output-dir", default="runs", help="where to look for the job's run directory (default: runs)")
    lg.add_argument("--failure-only", action="store_true", help="only report the first failure")
    lg.add_argument("--stats", action="store_true",
                    help="per-rank step time (median, p95), data wait per node, stragglers")
    lg.set_defaults(func=commands.logs)

    sw = sub.add_parser("sweep", help="submit a grid of train.* values as one Slurm job array",
                        description="One array task per combination of the axes (train.KEY=V1,V2,...), each in its "
                                    "own run directory <output_dir>/<name>/<array-id>_<task>-<overrides>; single "
                                    "values (KEY=V) apply to every task. Every combination is validated and checked "
                                    "before anything is queued.")
    sw.add_argument("spec", help="YAML job spec the sweep starts from")
    sw.add_argument("overrides", nargs="+", metavar="KEY=V1,V2", help="axes (several values) and fixed overrides")
    for flag in FLAG_KEYS:
        sw.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar=flag.upper(), help=FLAG_HELP[flag])
    sw.add_argument("--max-parallel", type=int, default=None, metavar="K",
                    help="run at most K tasks at a time (Slurm's %%K throttle)")
    sw.add_argument("--dry-run", action="store_true", help="check and print the array script, submit nothing")
    sw.add_argument("--no-check", action="store_true", help="skip the login-node checks of each point")
    sw.add_argument("--after", action="append", default=[], metavar="JOB[:TYPE]", help="as for submit")
    sw.add_argument("--parsable", action="store_true", help="print only the array's job id")
    sw.set_defaults(func=commands.sweep)

    swr = sub.add_parser("sweep-report", help="a sweep's tasks side by side: overrides, state, losses, tokens/s; a PNG")
    swr.add_argument("job", help="the sweep's array job id")
    swr.add_argument("--output-dir", default="runs", help="where the sweep's run directories are (default: runs)")
    swr.set_defaults(func=commands.sweep_report)

    rn = sub.add_parser("runs", help="a table of past and current runs: state, world, steps, eval loss, tokens/s, MFU")
    rn.add_argument("name", nargs="?", help="only runs of this job name (default: every name)")
    rn.add_argument("--output-dir", default="runs", help="where the run directories are (default: runs)")
    rn.set_defaults(func=commands.runs)

    st = sub.add_parser("status", help="state of your jobs (squeue, then scontrol/sacct)")
    st.add_argument("job_ids", nargs="*", help="jobs to show, also finished ones (default: every job in the queue)")
    st.set_defaults(func=commands.status)

    c = sub.add_parser("cancel", help="cancel jobs (scancel)")
    c.add_argument("job_ids", nargs="+", help="jobs to cancel (scancel); a cancelled job is not requeued")
    c.set_defaults(func=commands.cancel)

    m = sub.add_parser("make-tiny-model", help="build a small random model (Llama by default) + BPE tokenizer locally")
    m.add_argument("out_dir", help="directory to write the model and tokenizer to (save_pretrained)")
    m.add_argument("--arch", choices=tuple(FAMILIES), default="llama", metavar="FAMILY",
                   help="model family: " + ", ".join(f"{k} ({v})" for k, v in FAMILIES.items()))
    m.add_argument("--hidden-size", type=int, default=128, help="hidden size (default 128: ~1.2M parameters)")
    m.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    m.add_argument("--heads", type=int, default=4, help="attention heads; must divide --hidden-size (default 4)")
    m.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size to train (default 4096)")
    m.add_argument("--corpus", nargs="*", default=None, help="JSONL files to train the tokenizer on")
    m.set_defaults(func=commands.make_tiny)
    return p


def _submit_overrides(args: argparse.Namespace) -> None:
    """A spec argument that is really key=value, and the resource flags, become dotted overrides."""
    overrides = list(args.overrides)
    if args.spec and "=" in args.spec and not Path(args.spec).exists():
        overrides.insert(0, args.spec)
        args.spec = None
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    args.overrides = overrides


def main(argv: list[str] | None = None) -> int:
    from hpcft.jobs import SlurmUnavailable

    args_list, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(args_list)
    if extra:
        # key=value overrides may follow flags (hpcft submit spec.yaml --nodes 2 train.lr=3e-4).
        if args.cmd not in ("submit", "prepare", "sweep") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.cmd in ("submit", "prepare"):
        _submit_overrides(args)
    if args.cmd == "sweep":
        args.overrides = list(args.overrides) + [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items()
                                                 if getattr(args, flag, None) is not None]
    try:
        return args.func(args, command)
    except (SpecError, SlurmUnavailable) as exc:
        print(f"hpcft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
