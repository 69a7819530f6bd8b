"""What each CLI command does and prints (rich output); the work itself is in the modules. Each
handler takes the parsed arguments and the words after `--`, and returns the exit status."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hpcft import jobs
from hpcft.errors import SpecError
from hpcft.paths import RunPaths, data_cache_dir, find_run_dir

# Piped or in a batch log, rich would squeeze tables to 80 columns and cut job states short.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def submit(args: argparse.Namespace, command: list[str]) -> int:
    from hpcft.render import render_sbatch
    from hpcft.render_submitit import render_submitit
    from hpcft.spec import load_spec, resolve_paths
    from hpcft.submit import SubmitError, check_before_queue
    from hpcft.submit import submit as do_submit

    spec_path, dry_run, wait, prepare = args.spec, args.dry_run, args.wait, args.prepare
    spec = load_spec(spec_path, args.overrides)
    flag_notes: list[str] = []
    if command and command[0].startswith("--"):  # flags for the shared entrypoint, over the spec's train:
        from hpcft.train.config import parse_flags

        train, flag_notes = parse_flags(command, base=spec.train)
        train.validate()
        spec = spec.replace(train=train)
    elif command:
        spec = spec.replace(launch=spec.launch.__class__(**{**spec.launch.__dict__, "command": tuple(command)}))
    spec = resolve_paths(spec, Path.cwd())
    source = spec_path or "hpcft defaults"
    if dry_run:
        # The same checks as a real submission, so a dry run that prints a script means it would queue.
        for note in [] if args.no_check else check_before_queue(spec):
            err.print(f"hpcft: note: {note}")
        _print_flag_notes(flag_notes)
        if prepare:
            from hpcft.render import render_prepare_sbatch

            sys.stdout.write(render_prepare_sbatch(spec, source=source))
            sys.stdout.write("\n# ---- then the training job, queued with --dependency=afterok:<that job> ----\n")
        if spec.launch.backend == "submitit":
            sys.stdout.write(render_submitit(spec, python=shlex.quote(sys.executable)))
        else:
            sys.stdout.write(render_sbatch(spec, source=source))
        return 0
    from hpcft.submit import parse_after

    after = parse_after(args.after)
    try:
        sub = do_submit(spec, source=source, check=not args.no_check, prepare=prepare, after=after)
    except SubmitError as exc:
        err.print(f"hpcft: error: {exc}")
        return 2
    _print_flag_notes(flag_notes)
    if args.parsable:
        print(sub.job_id, flush=True)
        if not wait:
            return 0
        info = jobs.wait_for(sub.job_id)
        return 0 if info is not None and info.state == "COMPLETED" else 1
    table = Table(show_header=False, box=None)
    if sub.prepare_job_id:
        table.add_row("prepare", f"[bold]{sub.prepare_job_id}[/] (tokenizes the data into "
                                 f"{spec.train.data_cache_dir or data_cache_dir(spec.output_dir)}; training starts "
                                 "after it succeeded)")
    table.add_row("job", f"[bold]{sub.job_id}[/] ({spec.name}, {sub.backend}, {spec.resources.nodes} node(s) x "
                         f"{spec.resources.gpus_per_node} GPU(s))")
    if sub.dependencies:
        table.add_row("waits for", ", ".join(sub.dependencies))
    table.add_row("run dir", str(sub.run_dir))
    table.add_row("rank logs", str(sub.run_dir / "rank-NNN.log"))
    table.add_row("metrics", str(RunPaths(sub.run_dir).metrics))
    table.add_row("model", str(RunPaths(sub.run_dir).model))
    table.add_row("job output", str(sub.slurm_output))
    table.add_row("follow", f"hpcft status {sub.job_id}   hpcft logs {sub.job_id}   hpcft cancel {sub.job_id}")
    console.print(table)
    if not wait:
        return 0
    info = jobs.wait_for(sub.job_id)
    state = info.state if info else "UNKNOWN"
    print_closing_summary(sub.run_dir, state)
    if state != "COMPLETED":
        if sub.run_dir.is_dir():
            show_logs(str(sub.run_dir), spec.output_dir, failure_only=True)
        return 1
    return 0


def _print_flag_notes(notes: list[str]) -> None:
    """What each llama-recipes flag after `--` became (once the job passed every check)."""
    for note in notes:
        err.print(f"hpcft: llama-recipes flag {note}", markup=False)


def sweep(args: argparse.Namespace, _command: list[str]) -> int:
    """Check every point of the grid, then queue one job array (or print its script)."""
    from hpcft.render import ArrayPlan, render_sbatch
    from hpcft.spec import read_spec_file, resolve_paths
    from hpcft.submit import SubmitError, check_before_queue, parse_after, submit_sweep
    from hpcft.sweep import grid, split_axes

    fixed, axes = split_axes(args.overrides)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SpecError("--max-parallel", f"must be >= 1 (got {args.max_parallel})")
    data = read_spec_file(Path(args.spec)) if Path(args.spec).is_file() else None
    if data is None:
        raise SpecError("spec", f"no such file {args.spec!r}; pass a YAML file such as jobs/samsum_tiny.yaml")
    points = [dataclasses.replace(p, spec=resolve_paths(p.spec, Path.cwd())) for p in grid(data, fixed, axes)]
    if args.dry_run:
        if not args.no_check:
            for p in points:
                check_before_queue(p.spec)
        plan = ArrayPlan(tuple((p.label, tuple(p.train_args)) for p in points), args.max_parallel)
        sys.stdout.write(render_sbatch(points[0].spec, source=args.spec, array=plan))
        return 0
    try:
        job_id, manifest = submit_sweep(points, source=args.spec, max_parallel=args.max_parallel,
                                        check=not args.no_check, after=parse_after(args.after))
    except SubmitError as exc:
        err.print(f"hpcft: error: {exc}")
        return 2
    if args.parsable:
        print(job_id)
        return 0
    spec = points[0].spec
    table = Table(show_header=False, box=None)
    table.add_row("sweep", f"[bold]{job_id}[/] ({spec.name}: {len(points)} tasks"
                           f"{f', at most {args.max_parallel} at a time' if args.max_parallel else ''}; "
                           f"{', '.join(f'{a.key} in {list(a.values)}' for a in axes)})")
    table.add_row("run dirs", f"{spec.output_dir}/{spec.name}/{job_id}_<task>-<overrides>")
    table.add_row("manifest", str(manifest))
    table.add_row("follow", f"hpcft status {job_id}   hpcft sweep-report {job_id}   hpcft cancel {job_id}")
    console.print(table)
    return 0


def sweep_report(args: argparse.Namespace, _command: list[str]) -> int:
    """The sweep's tasks in one table (states from Slurm), and a PNG of their eval losses."""
    import json

    from hpcft.paths import find_sweep_manifest, sweep_plot
    from hpcft.sweep import report_plot, report_rows, report_table

    path = find_sweep_manifest(args.job, args.output_dir)
    if path is None:
        raise SpecError("job", f"no sweep {args.job} under {args.output_dir}/*/ ({args.job}.sweep.json); pass "
                               "the array job id hpcft sweep printed, and --output-dir")
    man = json.loads(path.read_text())
    states = {}
    for p in man["points"]:
        info = jobs.job_info(f"{man['job']}_{p['task']}")
        states[p["task"]] = info.state if info else "UNKNOWN"
    rows = report_rows(man, args.output_dir, path.parent.name, states)
    console.print(report_table(rows, man["job"]))
    plot = report_plot(rows, sweep_plot(args.output_dir, path.parent.name, man["job"]), man["job"])
    console.print(f"eval loss by point: {plot}" if plot else "no task has finished: no plot yet")
    return 0


def print_closing_summary(run_dir: Path, state: str) -> None:
    """One row of the runs table for the job that just ended, and where its outputs are."""
    from hpcft.runtable import run_row, runs_table, where_table

    row = run_row(run_dir, state)
    console.print(runs_table([row], title=f"job {row.job}"))
    console.print(where_table(row))


def runs(args: argparse.Namespace, _command: list[str]) -> int:
    """Past and current runs under the output directory, one row each (state from squeue while a job is
    queued or running, else from what its ranks wrote)."""
    from hpcft.runtable import find_runs, run_row, runs_table

    found = find_runs(args.output_dir, args.name)
    if not found:
        where = f"{args.output_dir}/{args.name}" if args.name else args.output_dir
        console.print(f"no runs under {where} (hpcft runs [NAME] --output-dir DIR)")
        return 0 if not args.name else 1
    try:
        live = {j.job_id: j.state for j in jobs.queue([d.name for d in found])}
    except jobs.SlurmUnavailable:
        live = {}
    console.print(runs_table([run_row(d, live.get(d.name)) for d in found],
                             title=f"hpcft runs in {args.output_dir}" + (f" ({args.name})" if args.name else "")))
    return 0


def prepare(args: argparse.Namespace, _command: list[str]) -> int:
    """Tokenize the spec's data into the shared cache here (the same step the ranks and the --prepare
    job run), after the login-node data checks."""
    import time

    from hpcft.prepare import prepare as do_prepare
    from hpcft.spec import load_spec, resolve_paths
    from hpcft.submit import check_data

    spec = resolve_paths(load_spec(args.spec, args.overrides), Path.cwd())
    t = spec.train
    if not (Path(t.model_name) / "config.json").is_file() and not (Path(t.tokenizer_name or t.model_name)).is_dir():
        raise SpecError("train.model_name", f"no model or tokenizer directory at {t.model_name}")
    check_data(spec)
    root = Path(t.data_cache_dir) if t.data_cache_dir else data_cache_dir(spec.output_dir)
    start = time.perf_counter()
    done = do_prepare(t, root, num_proc=args.num_proc, rebuild=args.rebuild, log=lambda line: err.print(line, markup=False))
    table = Table(show_header=False, box=None)
    table.add_row("cache", f"{done.train.path.parent} ({'tokenized now' if done.built else 'already there'}, "
                           f"{time.perf_counter() - start:.1f} s)")
    table.add_row("train", f"{done.train.examples:,} examples, {done.train.tokens:,} tokens ({done.form})")
    table.add_row("eval", f"{done.eval.examples:,} examples, {done.eval.tokens:,} tokens ({done.eval.path})" if done.eval
                  else f"none in the data: training holds out val_fraction {t.val_fraction}")
    console.print(table)
    return 0


def logs(args: argparse.Namespace, _command: list[str]) -> int:
    if args.stats:
        return show_stats(args.ref, args.output_dir)
    return show_logs(args.ref, args.output_dir, failure_only=args.failure_only)


def show_stats(ref: str, output_dir: str) -> int:
    """Per-rank step times (busy and wall, median and p95), data wait per node, stragglers: from
    summary.json when the run finished, else from the ranks' heartbeat files (running or failed)."""
    import json

    from hpcft.heartbeat import read_heartbeats
    from hpcft.rankstats import format_stats, rank_summary

    paths = RunPaths(_run_dir(ref, output_dir))
    summary = json.loads(paths.summary.read_text()) if paths.summary.exists() else {}
    if "step_time_per_rank" not in summary:
        beats = read_heartbeats(paths)
        if not beats:
            err.print(f"hpcft: no step statistics in {paths.run_dir} (no summary.json, no heartbeat files)")
            return 1
        summary = rank_summary([{"rank": b.rank, "host": b.host, **(b.stats or {})} for b in beats.values()
                                if b.stats])
        console.print(f"[dim]from the heartbeat files of {paths.run_dir}[/]")
    for line in format_stats(summary):
        print(line)
    return 0


def _run_dir(ref: str, output_dir: str) -> Path:
    run_dir = find_run_dir(ref, output_dir)
    if run_dir is None:
        raise SpecError("ref", f"no run directory {ref!r} and no job {ref!r} under {output_dir}/*/; "
                               "pass a run directory or --output-dir")
    return run_dir


def show_logs(ref: str, output_dir: str, *, failure_only: bool = False) -> int:
    """The job's own output, every rank's log, then the first rank that failed (exit 1 if one did)."""
    from hpcft.logs import first_failure, rank_by_rank_lines

    run_dir = _run_dir(ref, output_dir)
    paths = RunPaths(run_dir)
    if not failure_only:
        out = paths.job_output(output_dir)
        if out.exists():
            console.print(f"[dim]== job output {out}[/]")
            with out.open(errors="replace") as f:
                for line in f:
                    print(line.rstrip("\n"))
            console.print(f"[dim]== rank logs {run_dir}[/]")
        for line in rank_by_rank_lines(paths):
            print(line)
    from hpcft.logs import network_warning

    warning = network_warning(paths, paths.job_output(output_dir))
    if warning:
        err.print(f"[bold yellow]warning:[/] {warning}")
    if paths.refused.exists():
        err.print("[bold red]refused before any rank started:[/]", end=" ")
        err.print(paths.refused.read_text().strip(), markup=False)
        return 1
    failure = first_failure(paths)
    if failure is None:
        console.print(f"[green]no failed rank in {run_dir}[/]")
        return 0
    err.print(f"[bold red]first failure: rank {failure.rank}[/] on {failure.host or 'unknown host'} ({failure.reason})")
    for line in failure.tail:
        err.print(f"  {line}", markup=False)
    return 1


def status(args: argparse.Namespace, _command: list[str]) -> int:
    job_ids = args.job_ids
    rows = jobs.queue(job_ids or None)
    found = {r.job_id for r in rows}
    for jid in job_ids:
        if jid not in found:
            info = jobs.job_info(jid)
            if info is not None:
                rows.append(info)
            else:
                err.print(f"hpcft: no job {jid} in squeue, scontrol or sacct")
    table = Table(*jobs.SQUEUE_FIELDS, "ExitCode", "Restarts", title="hpcft jobs")
    colours = {"RUNNING": "green", "PENDING": "yellow", "COMPLETED": "blue", "FAILED": "red", "CANCELLED": "magenta"}
    for r in rows:
        c = colours.get(r.state.split()[0], "white")
        table.add_row(r.job_id, r.name, f"[{c}]{r.state}[/]", r.elapsed, r.time_limit, r.nodes, r.reason, r.exit_code,
                      r.restarts)
    if rows:
        console.print(table)
    elif not job_ids:
        console.print("no jobs in the queue (hpcft status JOB_ID shows a finished one)")
    return 0 if rows or not job_ids else 1


def cancel(args: argparse.Namespace, _command: list[str]) -> int:
    job_ids = args.job_ids
    proc = jobs.cancel(job_ids)
    if proc.returncode != 0:
        err.print(f"hpcft: scancel failed: {proc.stderr.strip()}")
        return 1
    console.print(f"cancelled {', '.join(job_ids)}")
    return 0


def launch(args: argparse.Namespace, command: list[str]) -> int:
    from hpcft.launch import check_entry_flags, launch_in_allocation

    if not command:
        raise SpecError("command", "give what each rank runs after --, e.g. hpcft launch -- -m hpcft.train")
    check_entry_flags(command)
    return launch_in_allocation(command, output_dir=args.output_dir, name=args.name)


def doctor(args: argparse.Namespace, _command: list[str]) -> int:
    from hpcft.launch import launch_in_allocation

    return launch_in_allocation(["-m", "hpcft.doctor"], output_dir=args.output_dir, name="doctor")


def make_tiny(args: argparse.Namespace, _command: list[str]) -> int:
    from hpcft.tiny import count_parameters, make_tiny_model

    out_dir, arch, hidden_size, heads, corpus = args.out_dir, args.arch, args.hidden_size, args.heads, args.corpus

    if hidden_size % heads:
        raise SpecError("--hidden-size", f"must be a multiple of --heads ({heads}); got {hidden_size}")
    files = corpus if corpus is not None else [p for p in ("data/samsum_tiny.jsonl", "data/alpaca_tiny.jsonl",
                                                           "data/chat_tiny.jsonl") if Path(p).is_file()]
    for f in files:
        if not Path(f).is_file():
            raise SpecError("--corpus", f"no such file {f}")
    path = make_tiny_model(out_dir, corpus=files, vocab_size=args.vocab_size, hidden_size=hidden_size,
                           num_layers=args.layers, num_heads=heads, arch=arch)
    console.print(f"tiny {arch} model: {path} ({count_parameters(path):,} parameters; "
                  f"tokenizer from {len(files)} file(s))")
    return 0
