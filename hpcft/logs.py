"""Read a run's per-rank logs back: merged with rank prefixes, and the first rank that failed.

    hpcft logs 123456            # or a run directory
Streams each file line by line, so memory does not grow with the size of the logs.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from hpcft.paths import RunPaths

TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class RankExit:
    rank: int
    host: str | None
    returncode: int
    signal: str | None
    ended: float


@dataclass(frozen=True)
class Failure:
    rank: int
    host: str | None
    reason: str  # "exit code 1", "signal SIGKILL", "traceback in log"
    tail: list[str]  # the traceback (or the log's last lines)


def read_exits(paths: RunPaths) -> dict[int, RankExit]:
    out = {}
    for p in paths.run_dir.glob("rank-*.exit.json"):
        try:
            d = json.loads(p.read_text())
            out[int(d["rank"])] = RankExit(int(d["rank"]), d.get("host"), int(d["returncode"]), d.get("signal"),
                                           float(d.get("ended", 0.0)))
        except (ValueError, KeyError, OSError):
            continue
    return out


def traceback_tail(log: Path, max_lines: int = 30) -> tuple[bool, list[str]]:
    """The last traceback in a log (streamed), else its last lines."""
    last_lines: deque[str] = deque(maxlen=max_lines)
    tb: list[str] | None = None
    with log.open(errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            last_lines.append(line)
            if TRACEBACK in line:
                tb = [line]
            elif tb is not None and len(tb) < 200:
                tb.append(line)
    if tb is not None:
        return True, tb[-max_lines:]
    return False, list(last_lines)


def first_failure(paths: RunPaths) -> Failure | None:
    """The rank that failed first: earliest non-zero exit record; ranks killed afterwards by the
    launcher (SIGTERM) only count if nothing failed before them. Without exit records (a wrapper
    was killed outright), the first log holding a traceback."""
    exits = read_exits(paths)
    failed = sorted((e for e in exits.values() if e.returncode != 0),
                    key=lambda e: (e.signal in ("SIGTERM", "SIGINT"), e.ended, e.rank))
    if failed:
        e = failed[0]
        reason = f"signal {e.signal}" if e.signal else f"exit code {e.returncode}"
        log = paths.rank_log(e.rank)
        tail = traceback_tail(log)[1] if log.exists() else []
        return Failure(e.rank, e.host, reason, tail)
    for rank, log in paths.rank_logs():
        if rank in exits:
            continue
        has_tb, tail = traceback_tail(log)
        if has_tb:
            return Failure(rank, None, "traceback in log", tail)
    return None


def merged_lines(paths: RunPaths) -> Iterator[str]:
    for rank, log in paths.rank_logs():
        with log.open(errors="replace") as f:
            for line in f:
                yield f"[rank {rank:03d}] {line.rstrip(chr(10))}"


def write_report(paths: RunPaths, out: TextIO, *, merged: bool = True) -> Failure | None:
    if merged:
        for line in merged_lines(paths):
            out.write(line + "\n")
    failure = first_failure(paths)
    return failure
