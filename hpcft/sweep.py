"""Sweeps as one Slurm job array: the grid of `train.*` values, one array task per combination, each
task its own run directory named by its overrides; and the report over their summaries (no torch).

    hpcft sweep jobs/fsdp_lora_tiny.yaml train.lr=1e-4,3e-4 train.lora_r=8,16 --max-parallel 2
    hpcft sweep-report 602700
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from hpcft.errors import SpecError
from hpcft.spec import JobSpec, spec_from_dict

_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclass(frozen=True)
class Axis:
    key: str  # dotted, train.*
    values: tuple[str, ...]  # as the user wrote them


@dataclass(frozen=True)
class Point:
    """One combination of the grid: its array task index, overrides and the spec they make."""

    index: int
    overrides: tuple[tuple[str, str], ...]  # (dotted key, value as written)
    spec: JobSpec

    @property
    def label(self) -> str:
        """lr=1e-4,lora_r=8: the last part of each key and the value as written, safe in a file name."""
        text = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.overrides)
        return _LABEL_UNSAFE.sub("_", text)[:120]

    @property
    def train_args(self) -> list[str]:
        return self.spec.train.to_args()


def split_axes(items: list[str] | tuple[str, ...]) -> tuple[list[str], list[Axis]]:
    """key=value items -> (fixed overrides, axes): an item with one value is an override for every
    point (resources.time=02:00:00), one with several (train.lr=1e-4,3e-4) an axis of the grid."""
    fixed, multi = [], []
    for item in items:
        _, sep, raw = item.partition("=")
        # a YAML list ([q_proj,v_proj]) is one value of a list field, not several values
        (multi if sep and "," in raw and not raw.lstrip().startswith("[") else fixed).append(item)
    return fixed, parse_axes(multi)


def parse_axes(items: list[str] | tuple[str, ...]) -> list[Axis]:
    """`train.lr=1e-4,3e-4` -> Axis("train.lr", ("1e-4", "3e-4")); only train.* varies inside one array
    (its tasks share the job's resources)."""
    axes = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not raw:
            raise SpecError(item, "sweep axes are written key=v1,v2,..., e.g. train.lr=1e-4,3e-4")
        if not key.startswith("train."):
            raise SpecError(key, "a sweep varies train.* fields only; the array's tasks share one job's resources "
                                 "(submit other resources as separate jobs)")
        if any(a.key == key for a in axes):
            raise SpecError(key, "given twice; list all its values in one axis, e.g. train.lr=1e-4,3e-4")
        values = tuple(v.strip() for v in raw.split(","))
        if any(not v for v in values) or len(set(values)) != len(values):
            raise SpecError(key, f"values must be distinct and non-empty (got {raw!r})")
        axes.append(Axis(key, values))
    if not axes:
        raise SpecError("sweep", "give at least one axis with two or more values, e.g. train.lr=1e-4,3e-4")
    return axes


def grid(data: dict, overrides: list[str] | tuple[str, ...], axes: list[Axis]) -> list[Point]:
    """Every combination of the axes, each validated as a whole spec (a bad value names its point)."""
    points = []
    for index, combo in enumerate(itertools.product(*(a.values for a in axes))):
        pairs = tuple(zip((a.key for a in axes), combo))
        try:
            spec = spec_from_dict(data, [*overrides, *(f"{k}={v}" for k, v in pairs)])
        except SpecError as exc:
            raise SpecError(exc.field, f"{exc.message} (sweep point {index}: "
                                       f"{', '.join(f'{k}={v}' for k, v in pairs)})") from None
        points.append(Point(index, pairs, spec))
    return points


def manifest(job_id: str, source: str, axes: dict[str, list[str]], points: list[Point]) -> dict:
    return {"job": job_id, "spec": source, "axes": axes,
            "points": [{"task": p.index, "label": p.label, "overrides": dict(p.overrides)} for p in points]}


# ---------------------------------------------------------------------------------------------
# The report.


@dataclass(frozen=True)
class ReportRow:
    task: int
    overrides: dict[str, str]
    state: str
    steps: str
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    run_dir: Path


def report_rows(man: dict, output_dir: str | Path, name: str, states: dict[int, str]) -> list[ReportRow]:
    from hpcft.paths import RunPaths, sweep_task_dir

    rows = []
    for p in man["points"]:
        run_dir = sweep_task_dir(output_dir, name, man["job"], p["task"], p["label"])
        try:
            s = json.loads(RunPaths(run_dir).summary.read_text())
        except (OSError, ValueError):
            s = {}
        rows.append(ReportRow(p["task"], p["overrides"], states.get(p["task"], "UNKNOWN"),
                              f"{s['steps']}/{s['total_steps']}" if "steps" in s else "-", s.get("final_train_loss"),
                              s.get("eval_loss_after"), s.get("tokens_per_s"), run_dir))
    return rows


def report_table(rows: list[ReportRow], job: str):
    from rich.table import Table

    keys = list(rows[0].overrides) if rows else []
    table = Table("task", *keys, "state", "steps", "final train loss", "eval loss", "tokens/s", title=f"sweep {job}")
    best = min((r.eval_loss for r in rows if r.eval_loss is not None), default=None)
    for r in rows:
        ev = "-" if r.eval_loss is None else f"{r.eval_loss:.4f}" + (" (best)" if r.eval_loss == best else "")
        table.add_row(str(r.task), *(r.overrides[k] for k in keys), r.state, r.steps,
                      "-" if r.train_loss is None else f"{r.train_loss:.4f}", ev,
                      "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}")
    return table


def report_plot(rows: list[ReportRow], out: Path, job: str) -> Path | None:
    """Eval loss for every point of the grid: bars grouped by the first axis, one colour per value of
    the rest."""
    done = [r for r in rows if r.eval_loss is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(rows[0].overrides)
    first = list(dict.fromkeys(r.overrides[keys[0]] for r in rows))
    rest = list(dict.fromkeys(",".join(f"{k}={r.overrides[k]}" for k in keys[1:]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(first) * max(1, len(rest))), 3.6))
    width = 0.8 / max(1, len(rest))
    for j, other in enumerate(rest):
        vals = [next((r.eval_loss for r in done if r.overrides[keys[0]] == v and
                      ",".join(f"{k}={r.overrides[k]}" for k in keys[1:]) == other), 0.0) for v in first]
        ax.bar([i + j * width for i in range(len(first))], vals, width, label=other or None)
    ax.set_xticks([i + width * (len(rest) - 1) / 2 for i in range(len(first))], [f"{keys[0].rsplit('.', 1)[-1]}={v}" for v in first])
    ax.set_ylabel("eval loss after training")
    ax.set_title(f"sweep {job}")
    if any(rest):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
