"""Read a run's per-rank logs back: merged with rank prefixes, and the first rank that failed.

    hpcft logs 123456            # or a run directory
Streams each file in fixed-size blocks, so memory does not grow with the size of the logs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hpcft.hang import STACK_BLOCK, WATCHDOG_MARK, describe, find_culprit
from hpcft.heartbeat import HANG_EXIT, read_heartbeats
from hpcft.paths import RunPaths

TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class RankExit:
    rank: int
    host: str | None
    returncode: int
    signal: str | None
    ended: float
    stopped: bool = False  # its wrapper found it stopped (SIGSTOP) and killed it


@dataclass(frozen=True)
class Failure:
    rank: int
    host: str | None
    reason: str  # "exit code 1", "signal SIGKILL", "traceback in log"
    tail: list[str]  # the traceback (or the log's last lines)


def read_exits(paths: RunPaths) -> dict[int, RankExit]:
    out = {}
    for p in paths.rank_exits():
        try:
            d = json.loads(p.read_text())
            out[int(d["rank"])] = RankExit(int(d["rank"]), d.get("host"), int(d["returncode"]), d.get("signal"),
                                           float(d.get("ended", 0.0)), bool(d.get("stopped")))
        except (ValueError, KeyError, OSError):
            continue
    return out


BLOCK = 1 << 20  # bytes read at a time: memory stays flat whatever the size of the logs
TB = TRACEBACK.encode()


def last_traceback_offset(log: Path, needle: bytes = TB) -> int | None:
    """Byte offset of the last traceback header (or other needle) in a log, scanning fixed-size blocks
    as bytes (no per-line decoding: about as fast as grep, and the memory does not grow with the file)."""
    overlap = len(needle) - 1
    last, pos, carry = None, 0, b""
    with log.open("rb", buffering=0) as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                return last
            buf = carry + block if carry else block
            i = buf.rfind(needle)
            if i >= 0:
                last = pos - len(carry) + i
            carry = buf[-overlap:]
            pos += len(block)


def _lines_from(log: Path, offset: int, max_lines: int, max_bytes: int = 256 * 1024) -> list[str]:
    """Up to max_lines lines starting at the line that holds byte `offset`."""
    with log.open("rb") as f:
        start = max(0, offset - 4096)
        f.seek(start)
        before = f.read(offset - start)
        line_start = start + before.rfind(b"\n") + 1
        f.seek(line_start)
        text = f.read(max_bytes).decode(errors="replace")
    return text.splitlines()[:max_lines]


def _last_lines(log: Path, max_lines: int, max_bytes: int = 64 * 1024) -> list[str]:
    with log.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        lines = f.read().decode(errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-max_lines:]


def traceback_tail(log: Path, max_lines: int = 30) -> tuple[bool, list[str]]:
    """The last traceback in a log (up to 200 lines of it, the last max_lines shown), else its last lines."""
    offset = last_traceback_offset(log)
    if offset is None:
        return False, _last_lines(log, max_lines)
    return True, _lines_from(log, offset, 200)[-max_lines:]


def hang_failure(paths: RunPaths, exits: dict[int, RankExit]) -> Failure | None:
    """The rank that hung first (hpcft/hang.py), when watchdogs ended the job or a rank was stopped."""
    culprit = find_culprit(read_heartbeats(paths), stopped={r for r, e in exits.items() if e.stopped},
                           hang_exits={r for r, e in exits.items() if e.returncode == HANG_EXIT})
    if culprit is None:
        return None
    log = paths.rank_log(culprit.beat.rank)
    offset = None
    if log.exists():
        offset = last_traceback_offset(log, WATCHDOG_MARK.encode())
        offset = offset if offset is not None else last_traceback_offset(log, STACK_BLOCK.encode())
    reason, lines = describe(culprit, _lines_from(log, offset, 400) if offset is not None else [])
    return Failure(culprit.beat.rank, culprit.beat.host, reason, lines)


def first_failure(paths: RunPaths) -> Failure | None:
    """The rank that failed first: earliest non-zero exit record; ranks killed afterwards by the
    launcher (SIGTERM) only count if nothing failed before them. When the job ended in a hang
    (watchdogs fired, or a rank was stopped), the rank that stopped first, unless a rank failed
    outright before any watchdog fired. Without exit records (a wrapper was killed outright), of
    the logs that end in a traceback the one written to last the earliest: the ranks that fail
    afterwards, of a lost peer, stop writing later."""
    exits = read_exits(paths)
    failed = sorted((e for e in exits.values() if e.returncode != 0),
                    key=lambda e: (e.signal in ("SIGTERM", "SIGINT"), e.ended, e.rank))
    hang = hang_failure(paths, exits)
    if hang is not None:
        first_hang = min((e.ended for e in exits.values() if e.returncode == HANG_EXIT or e.stopped),
                         default=float("inf"))
        if not any(e.returncode != HANG_EXIT and not e.stopped and e.signal not in ("SIGTERM", "SIGINT")
                   and e.ended < first_hang for e in failed):
            return hang
    if failed:
        e = failed[0]
        reason = f"signal {e.signal}" if e.signal else f"exit code {e.returncode}"
        log = paths.rank_log(e.rank)
        tail = traceback_tail(log)[1] if log.exists() else []
        return Failure(e.rank, e.host, reason, tail)
    candidates = []
    for rank, log in paths.rank_logs():
        if rank in exits:
            continue
        offset = last_traceback_offset(log)
        if offset is not None:
            candidates.append((log.stat().st_mtime, rank, log, offset))
    if not candidates:
        return None
    _, rank, log, offset = min(candidates)
    return Failure(rank, None, "traceback in log", _lines_from(log, offset, 200)[-30:])


def rank_by_rank_lines(paths: RunPaths) -> Iterator[str]:
    """Every rank's log in turn (rank 0 first, not interleaved by time: the lines carry no clock),
    each line prefixed with [rank NNN]."""
    for rank, log in paths.rank_logs():
        with log.open(errors="replace") as f:
            for line in f:
                yield f"[rank {rank:03d}] {line.rstrip(chr(10))}"


NCCL_HEAD_BYTES = 256 << 10  # NCCL reports its transport at init: the head of each rank log holds it
LAUNCH_IB = re.compile(r"hpcft\.launch: network on (\S+):.*InfiniBand devices here: (.+)$")


def network_warning(paths: RunPaths, job_output: Path | None = None) -> str | None:
    """A warning when NCCL ran over TCP sockets where InfiniBand exists: from NCCL's INFO lines at the
    head of the rank logs and the launchers' "InfiniBand devices here" lines in the job output."""
    from hpcft.network import nccl_transport, socket_over_ib_warning

    lines: list[str] = []
    for _, log in paths.rank_logs():
        with log.open("rb") as f:
            lines += f.read(NCCL_HEAD_BYTES).decode("utf-8", "replace").splitlines()
    node_ib: dict[str, list[str]] = {}
    if job_output is not None and job_output.exists():
        with job_output.open("rb") as f:
            for line in f.read(NCCL_HEAD_BYTES).decode("utf-8", "replace").splitlines():
                m = LAUNCH_IB.search(line)
                if m:
                    node_ib[m.group(1)] = [d.strip() for d in m.group(2).split(",")]
    return socket_over_ib_warning(nccl_transport(lines), node_ib)
