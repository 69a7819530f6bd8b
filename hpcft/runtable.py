"""Runs as table rows: `hpcft submit --wait`'s and the demo's closing summary, and `hpcft runs [NAME]`.
Read from run directories (summary.json, metrics.jsonl, exit records) and, for jobs still queued or
running, one squeue call; no torch.

    rows = [run_row(d) for d in find_runs("runs")]
    Console().print(runs_table(rows))
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hpcft.paths import RunPaths

COLUMNS = ("job", "name", "state", "world", "steps", "eval loss", "tokens/s", "MFU", "run directory")


@dataclass(frozen=True)
class RunRow:
    job: str
    name: str
    state: str
    world: str  # ranks (nodes)
    steps: str  # done/total
    eval_loss: str  # before -> after
    tokens_per_s: str
    mfu: str
    run_dir: Path
    model: Path | None  # the export, when written
    plot: Path | None  # metrics.png, when drawn
    logs: Path  # the rank logs' pattern

    def cells(self) -> tuple[str, ...]:
        return (self.job, self.name, self.state, self.world, self.steps, self.eval_loss, self.tokens_per_s, self.mfu,
                str(self.run_dir))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _last_step(paths: RunPaths) -> int | None:
    try:
        lines = paths.metrics.read_text().splitlines()
    except OSError:
        return None
    steps = [json.loads(x).get("step") for x in lines if '"loss"' in x]
    return max((s for s in steps if s is not None), default=None)


def state_from_files(paths: RunPaths, summary: dict) -> str:
    """How a run ended, from what its ranks wrote (for jobs Slurm no longer lists)."""
    if summary.get("finished"):
        return "COMPLETED"
    exits = [_read_json(p) for p in paths.rank_exits()]
    if any(e.get("returncode") not in (0, None) for e in exits):
        return "FAILED"
    if summary:
        return "STOPPED"  # ended early without finishing (max_steps_this_run, a preemption)
    if paths.requeue_marker.exists():
        return "REQUEUED"
    return "ENDED" if exits else "UNKNOWN"


def run_row(run_dir: Path, state: str | None = None) -> RunRow:
    paths = RunPaths(run_dir)
    s = _read_json(paths.summary)
    cfg = _read_json(paths.train_config)
    hosts = {r.get("host") for r in s.get("step_time_per_rank", []) if r.get("host")}
    world = f"{s['world_size']}" + (f" ({len(hosts)} node{'s' if len(hosts) != 1 else ''})" if hosts else "") \
        if "world_size" in s else "-"
    done = s.get("steps", _last_step(paths))
    total = s.get("total_steps")
    steps = "-" if done is None else f"{done}/{total}" if total else str(done)
    before, after = s.get("eval_loss_before"), s.get("eval_loss_after")
    loss = " -> ".join(f"{x:.4f}" for x in (before, after) if x is not None) or "-"
    if before is None and after is None and s.get("final_train_loss") is not None:
        loss = f"train {s['final_train_loss']:.4f}"
    model = paths.model if paths.model.is_dir() else None
    plot = Path(s["plot"]) if s.get("plot") else (paths.metrics_plot if paths.metrics_plot.exists() else None)
    return RunRow(job=run_dir.name, name=run_dir.parent.name or cfg.get("model_name", "-"),
                  state=state or state_from_files(paths, s), world=world, steps=steps, eval_loss=loss,
                  tokens_per_s=f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-",
                  mfu=f"{s['mfu']:.1%}" if s.get("mfu") else "-", run_dir=run_dir, model=model, plot=plot,
                  logs=run_dir / "rank-NNN.log")


def find_runs(output_dir: str | Path, name: str | None = None) -> list[Path]:
    """Run directories under <output_dir>/<name>/ (every name when None): those with a rank log or a
    training config, oldest job first."""
    root = Path(output_dir)
    parents = [root / name] if name else [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    runs = [d for parent in parents if parent.is_dir() for d in parent.iterdir()
            if d.is_dir() and (RunPaths(d).train_config.exists() or any(d.glob("rank-*.log")))]
    return sorted(runs, key=lambda d: (_job_key(d.name), d.parent.name))


def _job_key(name: str) -> tuple:
    head = name.split("-", 1)[0]
    return tuple(int(x) if x.isdigit() else 0 for x in head.split("_")) or (0,)


def runs_table(rows: list[RunRow], title: str = "hpcft runs"):
    from rich.table import Table

    table = Table(*COLUMNS, title=title)
    colours = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red", "CANCELLED": "magenta",
               "TIMEOUT": "red"}
    for row in rows:
        cells = list(row.cells())
        c = colours.get(row.state.split()[0])
        if c:
            cells[2] = f"[{c}]{row.state}[/]"
        table.add_row(*cells)
    return table


def where_table(row: RunRow):
    """Where a run's outputs are: the closing summary's second half."""
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_row("model", str(row.model) if row.model else "not exported (save_model: false, or the run ended early)")
    table.add_row("logs", f"{row.logs}   (hpcft logs {row.job})")
    table.add_row("metrics", str(RunPaths(row.run_dir).metrics))
    table.add_row("plot", str(row.plot) if row.plot else "none (plot: false)")
    table.add_row("summary", str(RunPaths(row.run_dir).summary))
    return table
