"""Per-rank heartbeat files: the last progress of a rank (step, phase, time, host, pid) and its step
statistics, left in the run directory as rank-NNN.heartbeat.json.

Written every few seconds by the rank's watchdog thread (hpcft/train/watchdog.py), not per step; read
back by `hpcft logs` (hpcft/hang.py names the rank that hung, `--stats` the stragglers). A rank that
is stopped (SIGSTOP) or killed writes nothing more, so its file keeps its last heartbeat, at most one
interval old. No torch import: the readers run on the login node.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hpcft.paths import RunPaths

HANG_EXIT = 124  # a rank's exit status when its watchdog ended it (as timeout(1) uses)


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    host: str
    pid: int
    step: int  # last completed optimizer step
    phase: str  # the phase entered last (data, forward, backward, optimizer, ...)
    beats: int  # phases entered since start: every rank runs the same sequence, so fewer means behind
    progress: float  # wall-clock time the rank entered that phase
    written: float  # wall-clock time of this write
    interval_s: float  # seconds between writes
    hang_timeout_s: int  # seconds without progress, while armed, before the watchdog ends the rank
    armed: bool  # the phase is one the watchdog guards (training steps after the first)
    hung: float | None = None  # wall-clock time the watchdog found no progress and ended the rank
    flight_recorder: str | None = None  # NCCL flight recorder dump of this rank (CUDA only)
    stats: dict | None = None  # rankstats.step_stats of this rank

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"


def write_heartbeat(path: Path, beat: Heartbeat) -> None:
    """Atomically (rename), so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(beat.to_json())
    os.replace(tmp, path)


def read_heartbeats(paths: RunPaths) -> dict[int, Heartbeat]:
    names = {f.name for f in dataclasses.fields(Heartbeat)}
    out = {}
    for p in paths.rank_heartbeats():
        try:
            d = json.loads(p.read_text())
            beat = Heartbeat(**{k: v for k, v in d.items() if k in names})
        except (ValueError, TypeError, OSError):
            continue
        out[beat.rank] = beat
    return out
