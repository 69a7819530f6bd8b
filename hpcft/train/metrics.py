"""metrics.jsonl and the progress display, both on rank 0 only."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsWriter:
    """Appends one JSON object per line; does nothing on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self._f = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a", encoding="utf-8")

    def write(self, **record: object) -> None:
        if self._f is not None:
            self._f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class ProgressDisplay:
    """A rich progress bar with ETA in a terminal; in a batch log, one plain line per logged step."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.start = time.monotonic()
        self.interactive = enabled and sys.stdout.isatty()
        self.console = Console(highlight=False, soft_wrap=True)
        self._progress = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._task = self._progress.add_task("train", total=total, info="")
            self._progress.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        self.console.print(f"step {step}/{self.total} | {info} | elapsed {_hms(elapsed)} | ETA {_hms(eta)}")

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
