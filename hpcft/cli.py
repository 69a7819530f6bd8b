"""hpcft command line: parse, delegate, print. Logic lives in the modules it calls.

    hpcft submit --nodes 2 --gpus-per-node 4 jobs/samsum_tiny.yaml train.lr=3e-4
    hpcft submit --dry-run jobs/samsum_tiny.yaml           # print the script, submit nothing
    hpcft launch -- -m hpcft.train --max_train_step=20     # inside salloc / srun --pty
    hpcft logs <job-id|run-dir>  |  hpcft status [job-id]  |  hpcft cancel <job-id>
    hpcft make-tiny-model artifacts/tiny-llama
    hpcft doctor                                           # inside salloc: preflight checks on every rank
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


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcft", description="Slurm-aware LLM fine-tuning.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("submit", help="render a job spec into an sbatch script and submit it")
    s.add_argument("spec", nargs="?", help="YAML job spec (default: built-in defaults)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    for flag in FLAG_KEYS:
        s.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar=flag.upper())
    s.add_argument("--dry-run", action="store_true", help="print the script that would be submitted")
    s.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it failed")

    la = sub.add_parser("launch", help="start all ranks inside an allocation (salloc / srun --pty)")
    la.add_argument("--output-dir", default="runs")
    la.add_argument("--name", default="interactive", help="run directory: <output-dir>/<name>/<job-id>")

    d = sub.add_parser("doctor", help="preflight checks on every rank of the current allocation")
    d.add_argument("--output-dir", default="runs")

    lg = sub.add_parser("logs", help="per-rank logs of a run, merged, and the first rank that failed")
    lg.add_argument("ref", help="job id or run directory")
    lg.add_argument("--output-dir", default="runs")
    lg.add_argument("--failure-only", action="store_true", help="only report the first failure")

    st = sub.add_parser("status", help="state of your jobs (squeue, then scontrol/sacct)")
    st.add_argument("job_ids", nargs="*")

    c = sub.add_parser("cancel", help="cancel jobs (scancel)")
    c.add_argument("job_ids", nargs="+")

    m = sub.add_parser("make-tiny-model", help="build a small Llama model + BPE tokenizer locally")
    m.add_argument("out_dir")
    m.add_argument("--arch", choices=("llama", "bart"), default="llama", help="decoder-only or encoder-decoder")
    m.add_argument("--hidden-size", type=int, default=128)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--vocab-size", type=int, default=4096)
    m.add_argument("--corpus", nargs="*", default=None, help="JSONL files to train the tokenizer on")
    return p


def main(argv: list[str] | None = None) -> int:
    args_list, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(args_list)
    if extra:
        # key=value overrides may follow flags (hpcft submit spec.yaml --nodes 2 train.lr=3e-4).
        if args.cmd != "submit" or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS[args.cmd](args, command)
    except SpecError as exc:
        print(f"hpcft: error: {exc}", file=sys.stderr)
        return 2


def cmd_submit(args: argparse.Namespace, command: list[str]) -> int:
    from hpcft import commands

    spec_path = args.spec
    overrides = list(args.overrides)
    if spec_path and "=" in spec_path and not Path(spec_path).exists():
        overrides.insert(0, spec_path)
        spec_path = None
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return commands.submit(spec_path, overrides, command, dry_run=args.dry_run, wait=args.wait)


def cmd_launch(args: argparse.Namespace, command: list[str]) -> int:
    from hpcft.launch import launch_in_allocation

    if not command:
        raise SpecError("command", "give what each rank runs after --, e.g. hpcft launch -- -m hpcft.train")
    launch_in_allocation(command, output_dir=args.output_dir, name=args.name)
    return 0


def cmd_doctor(args: argparse.Namespace, _command: list[str]) -> int:
    from hpcft.launch import launch_in_allocation

    launch_in_allocation(["-m", "hpcft.doctor"], output_dir=args.output_dir, name="doctor")
    return 0


def cmd_logs(args: argparse.Namespace, _command: list[str]) -> int:
    from hpcft import commands

    return commands.logs(args.ref, args.output_dir, failure_only=args.failure_only)


def cmd_status(args: argparse.Namespace, _command: list[str]) -> int:
    from hpcft import commands

    return commands.status(args.job_ids)


def cmd_cancel(args: argparse.Namespace, _command: list[str]) -> int:
    from hpcft import commands

    return commands.cancel(args.job_ids)


def cmd_make_tiny_model(args: argparse.Namespace, _command: list[str]) -> int:
    from hpcft import commands

    return commands.make_tiny(args.out_dir, arch=args.arch, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads,
                              vocab_size=args.vocab_size, corpus=args.corpus)


COMMANDS = {"submit": cmd_submit, "launch": cmd_launch, "doctor": cmd_doctor, "logs": cmd_logs, "status": cmd_status,
            "cancel": cmd_cancel, "make-tiny-model": cmd_make_tiny_model}

if __name__ == "__main__":
    sys.exit(main())
