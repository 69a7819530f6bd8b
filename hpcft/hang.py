"""Which rank hung: read back from the heartbeat files (hpcft/heartbeat.py) when a watchdog ended the
job (hpcft/train/watchdog.py) or a rank was found stopped (hpcft/rankrun.py).

In a hang every healthy rank ends up waiting in a collective for the stuck one and its watchdog
fires too, so "the first rank that exited" names a bystander. The culprit is, in this order:
  1. a rank its wrapper found stopped (SIGSTOP, state T) when the job was torn down;
  2. a rank whose heartbeat file stopped being written long before the others' (a frozen process:
     stopped, or wedged so that not even its watchdog thread ran);
  3. the rank furthest behind: fewest phases entered (every rank runs the same sequence of phases,
     and the waiting ranks entered the collective's phase that the stuck one never reached), then
     the earliest last progress.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from hpcft.heartbeat import Heartbeat

WATCHDOG_MARK = "hpcft.watchdog: rank "  # first line of a watchdog's stack dump in a rank's log
END_MARK = "hpcft.watchdog: end of stacks"
STACK_BLOCK = "(most recent call first):"  # faulthandler's thread header


@dataclass(frozen=True)
class Culprit:
    beat: Heartbeat  # its last heartbeat
    how: str  # stopped | frozen | behind
    others: tuple[Heartbeat, ...]  # every other rank's last heartbeat


def find_culprit(beats: dict[int, Heartbeat], *, stopped: set[int], hang_exits: set[int]) -> Culprit | None:
    """The rank that stopped first, when a hang ended the job (a watchdog fired, a rank exited with
    the watchdog's status, or a rank was stopped); else None."""
    if not beats or not (stopped or hang_exits or any(b.hung for b in beats.values())):
        return None
    latest = max(b.written for b in beats.values())
    frozen = [b for b in beats.values()
              if b.hung is None and latest - b.written > max(3 * b.interval_s, b.hang_timeout_s / 2)]
    stopped_beats = [beats[r] for r in sorted(stopped) if r in beats]
    if stopped_beats:
        beat, how = min(stopped_beats, key=lambda b: (b.written, b.rank)), "stopped"
    elif frozen:
        beat, how = min(frozen, key=lambda b: (b.written, b.rank)), "frozen"
    else:
        beat, how = min(beats.values(), key=lambda b: (b.beats, b.progress, b.rank)), "behind"
    return Culprit(beat, how, tuple(b for r, b in sorted(beats.items()) if r != beat.rank))


def main_stack(dump: list[str], max_frames: int = 8) -> list[str]:
    """The top of the main thread's stack from a watchdog dump (lines from WATCHDOG_MARK on), or from
    the last thread block faulthandler wrote on SIGTERM (the main thread comes last)."""
    if not dump:
        return []
    marked = dump[0].startswith(WATCHDOG_MARK)  # else the last dump faulthandler wrote on SIGTERM
    main_id = dump[0].rpartition("main thread ")[2].rstrip(")").strip() if marked else ""
    blocks: list[list[str]] = []
    for line in dump[1:] if marked else dump:
        if line.startswith(END_MARK):
            break
        if STACK_BLOCK in line:
            blocks.append([line])
        elif blocks and line.startswith("  File "):
            blocks[-1].append(line)
    if not blocks:
        return []
    main = next((b for b in blocks if main_id and main_id in b[0]), blocks[-1])
    return [main[0], *main[1:1 + max_frames]]


def describe(c: Culprit, dump: list[str]) -> tuple[str, list[str]]:
    """(reason, lines) for `hpcft logs`: what the culprit was doing, what the others did, its stack."""
    b = c.beat
    how = {"stopped": "stopped (SIGSTOP, state T)", "frozen": "frozen (its heartbeat stopped being written)",
           "behind": "no progress"}[c.how]
    step, phase = b.step, b.phase
    if c.how != "behind" and c.others and min(o.step for o in c.others) > step:
        # Its file is up to one heartbeat interval old; the others completed steps that need its all-reduce.
        step, phase = min(o.step for o in c.others), "unknown, its last heartbeat is older"
    reason = f"hung: {how}; last completed step {step}, phase {phase}"
    lines = [f"pid {b.pid}; last heartbeat: step {b.step}, phase {b.phase}, progress at {_clock(b.progress)}, "
             f"written at {_clock(b.written)} (every {b.interval_s:g} s)"]
    waiting = Counter((o.step, o.phase) for o in c.others)
    if waiting:
        (o_step, o_phase), n = waiting.most_common(1)[0]
        last_other = max(o.progress for o in c.others)
        lines.append(f"{len(c.others)} other rank(s) waited for it ({n} after step {o_step} in phase {o_phase}), "
                     f"their last progress at {_clock(last_other)}; hang_timeout_s {b.hang_timeout_s}")
    stack = main_stack(dump)
    if stack:
        lines.append("top of its stack (faulthandler):")
        lines += [f"  {stack[0].strip()}", *(f"  {line.rstrip()}" for line in stack[1:])]
    elif c.how in ("stopped", "frozen"):
        lines.append("no stack: a stopped or frozen process writes nothing; its last heartbeat above is "
                     "where it was (at most one heartbeat interval old)")
    if b.flight_recorder:
        lines.append(f"NCCL flight recorder: {b.flight_recorder} (all ranks: "
                     f"python -m torch.distributed.flight_recorder.fr_trace <run dir>/nccl_trace)")
    return reason, lines


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 10) % 10}"
