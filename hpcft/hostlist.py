"""Slurm hostlist expressions, without calling scontrol: 'gpu[01-03,07],login1' -> hosts."""
from __future__ import annotations

import re


def _split_top(expr: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in hostlist {expr!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        lo, sep, hi = rng.partition("-")
        if not sep:
            values = [lo]
        else:
            width = len(lo)
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        for v in values:
            out.extend(_expand_one(head + v + tail))
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm nodelist in Slurm's order ('node[1-2]' -> ['node1', 'node2'])."""
    hosts: list[str] = []
    for item in _split_top(expr.strip()):
        hosts.extend(_expand_one(item))
    return hosts
