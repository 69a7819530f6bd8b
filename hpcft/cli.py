"""hpcft command line: parse, delegate, print. Logic lives in the modules it calls.

    hpcft submit --nodes 2 --gpus-per-node 4 jobs/samsum_tiny.yaml train.lr=3e-4
    hpcft submit --dry-run jobs/samsum_tiny.yaml           # print the script, submit nothing
    hpcft launch -- -m hpcft.train --max_train_step=20     # inside salloc / srun --pty
    hpcft logs <job-id|run-dir> [--stats]  |  hpcft status [job-id]  |  hpcft cancel <job-id>
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

# CLI flag -> dotted spec key; the flags users type most, everything else via key=value.
FLAG_KEYS = {
    "nodes": "resources.nodes", "gpus_per_node": "resources.gpus_per_node",
    "cpus_per_task": "resources.cpus_per_task", "time": "resources.time", "mem": "resources.mem",
    "partition": "resources.partition", "account": "resources.account", "qos": "resources.qos",
    "constraint": "resources.constraint", "job_name": "name", "output_dir": "output_dir",
    "backend": "launch.backend",
}
FLAG_HELP = {"nodes": "a count, or an elastic range MIN-MAX (e.g. 2-4) that Slurm may start on any count in"}


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
    la.add_argument("--output-dir", default="runs")
    la.add_argument("--name", default="interactive", help="run directory: <output-dir>/<name>/<job-id>")
    la.set_defaults(func=commands.launch)

    d = sub.add_parser("doctor", help="preflight checks on every rank of the current allocation")
    d.add_argument("--output-dir", default="runs")
    d.set_defaults(func=commands.doctor)

    lg = sub.add_parser("logs", help="the job's output, then every rank's log, and the first rank that failed")
    lg.add_argument("ref", help="job id or run directory")
    lg.add_argument("--output-dir", default="runs")
    lg.add_argument("--failure-only", action="store_true", help="only report the first failure")
    lg.add_argument("--stats", action="store_true",
                    help="per-rank step time (median, p95), data wait per node, stragglers")
    lg.set_defaults(func=commands.logs)

    st = sub.add_parser("status", help="state of your jobs (squeue, then scontrol/sacct)")
    st.add_argument("job_ids", nargs="*")
    st.set_defaults(func=commands.status)

    c = sub.add_parser("cancel", help="cancel jobs (scancel)")
    c.add_argument("job_ids", nargs="+")
    c.set_defaults(func=commands.cancel)

    m = sub.add_parser("make-tiny-model", help="build a small Llama model + BPE tokenizer locally")
    m.add_argument("out_dir")
    m.add_argument("--arch", choices=("llama", "bart"), default="llama", help="decoder-only or encoder-decoder")
    m.add_argument("--hidden-size", type=int, default=128)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--vocab-size", type=int, default=4096)
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
        if args.cmd not in ("submit", "prepare") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.cmd in ("submit", "prepare"):
        _submit_overrides(args)
    try:
        return args.func(args, command)
    except (SpecError, SlurmUnavailable) as exc:
        print(f"hpcft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
