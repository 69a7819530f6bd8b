"""metrics.jsonl and the progress display, both on rank 0 only."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsWriter:
    """Appends one JSON object per line, and hands the same scalars to the run's experiment trackers
    (hpcft.train.trackers); rank 0 only."""

    def __init__(self, path: Path, enabled: bool, trackers=None):
        self.enabled = enabled
        self._f = None
        self._trackers = trackers if enabled else None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a", encoding="utf-8")

    def write(self, **record: object) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self._f.flush()
        if self._trackers is not None and isinstance(record.get("step"), int):
            prefix = "eval/" if record.get("event") == "eval" else "train/"
            scalars = {k: float(v) for k, v in record.items() if k not in ("step", "event", "epoch")
                       and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if scalars and record.get("event") in (None, "eval"):
                self._trackers.log(record["step"], scalars, prefix)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None


def effective_rows(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows as the run finally trained them: a restart event at step k discards the
    lines of steps after k written before it (trained again after the restart), so no step counts
    twice in plots or summaries. Event lines themselves are kept."""
    out: list[dict] = []
    for r in rows:
        if r.get("event") == "restart":
            out = [o for o in out if "event" in o or o.get("step", 0) <= r["step"]]
        out.append(r)
    return out


def read_rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def plot_metrics(metrics: Path, out: Path) -> Path | None:
    """loss (train and eval) and tokens/s against step, as a PNG next to the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = effective_rows(read_rows(metrics))
    train = [r for r in rows if "loss" in r and "event" not in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    if not train:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], label="tokens/s")
    ax2.plot([r["step"] for r in train], [r["useful_tokens_per_s"] for r in train], label="useful tokens/s")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens/s (all ranks)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class ProgressDisplay:
    """A rich progress bar with ETA in a terminal; in a batch log, one plain line per logged step."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.total = total
        self.first = start
        self.start = time.monotonic()
        self.interactive = enabled and sys.stdout.isatty()
        self.console = Console(highlight=False, soft_wrap=True)
        self._progress = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._task = self._progress.add_task("train", total=total, completed=start, info="")
            self._progress.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        self.console.print(f"step {step}/{self.total} | {info} | elapsed {_hms(elapsed)} | ETA {_hms(eta)}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
