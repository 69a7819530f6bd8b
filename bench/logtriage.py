"""Part 6: 1,024 rank logs x 10,000 lines, one rank failing with a traceback and no exit records (a
wrapper killed outright: the logs are all there is). Time for `hpcft logs RUN --failure-only` to name
the rank vs `grep -l Traceback` over the same files, and the peak memory of each, at 1,000 and
10,000 lines per rank."""
from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import PY, ROOT, env_for, median
from hpcft.paths import RunPaths

RANKS = 1024
FAILING = 777


def write_logs(run: Path, lines: int) -> int:
    """Training-log lines like the entrypoint's, a different mix per rank; returns bytes written."""
    if (run / "done").exists():
        return sum(p.stat().st_size for _, p in RunPaths(run).rank_logs())
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    r = random.Random(0)
    kinds = [
        "step {i}/{n} | loss {a:.4f} | lr {b:.2e} | {c:,} tok/s | MFU {d:.1%} | elapsed 0:{m:02d}:{s:02d} | ETA 0:41:07",
        "[rank{rank}] hpcft.train: checkpoint runs/job/123456/checkpoints/step-{i:08d}",
        "[W socket.cpp:{c}] [c10d] The client socket has timed out after 60s while trying to connect to (node{m}, {c}).",
        "NCCL INFO Channel {m:02d}/{s:02d} : {rank}[{m}] -> {c}[{s}] via P2P/IPC/read",
    ]
    body = []
    for i in range(lines):
        k = kinds[0] if i % 10 else kinds[i // 10 % 4]
        body.append(k.format(i=i, n=lines, a=r.random() * 4, b=r.random() * 1e-3, c=r.randrange(1000, 60000),
                             d=r.random(), m=i % 60, s=(i * 7) % 60, rank="{rank}") + "\n")
    text = "".join(body)
    total = 0
    for rank in range(RANKS):
        data = text.replace("{rank}", str(rank))
        if rank == FAILING:
            cut = data.rfind("\n", 0, len(data) * 2 // 3) + 1
            data = data[:cut] + ("Traceback (most recent call last):\n  File \"hpcft/train/loop.py\", line 98, in train\n"
                                 "    loss = engine.model(**batch).loss\ntorch.OutOfMemoryError: CUDA out of memory.\n")
        RunPaths(run).rank_log(rank).write_text(data)
        total += len(data)
    (run / "done").write_text("")
    return total


def timed_rss(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes and stdout+stderr. GNU time reports the command's own peak: a
    child forked straight from this Python process would inherit Python's high-water mark."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], capture_output=True, cwd=ROOT,
                              env=env_for(1))
        wall = time.perf_counter() - t
        kib = int(rss.read().strip().splitlines()[-1])
    return wall, kib * 1024, (proc.stdout + proc.stderr).decode(errors="replace")


def triage(out: Path, quick: bool) -> dict:
    sizes = (100, 1000) if quick else (1000, 10_000)
    result = {"ranks": RANKS, "failing_rank": FAILING, "sizes": {}}
    for lines in sizes:
        run = out / "logs" / f"lines{lines}"
        nbytes = write_logs(run, lines)
        files = [str(p) for _, p in RunPaths(run).rank_logs()]
        hp = [PY, "-m", "hpcft.cli", "logs", str(run), "--failure-only"]
        grep = ["grep", "-l", "Traceback", *files]
        timed_rss(grep)  # page cache warm for both
        t_h, t_g, rss_h, rss_g = [], [], 0, 0
        for _ in range(3 if quick else 5):
            t, rss, text = timed_rss(hp)
            if f"rank {FAILING}" not in text:
                raise RuntimeError(f"hpcft logs did not name rank {FAILING}:\n{text[-1500:]}")
            t_h.append(t)
            rss_h = max(rss_h, rss)
            t, rss, text = timed_rss(grep)
            if RunPaths(run).rank_log(FAILING).name not in text:
                raise RuntimeError(f"grep did not find rank {FAILING}: {text[-500:]}")
            t_g.append(t)
            rss_g = max(rss_g, rss)
        result["sizes"][str(lines)] = {"bytes": nbytes, "hpcft_logs_s": median(t_h), "grep_s": median(t_g),
                                       "ratio": median(t_h) / median(t_g), "hpcft_logs_peak_rss": rss_h,
                                       "grep_peak_rss": rss_g, "runs_hpcft": t_h, "runs_grep": t_g}
    small, big = (result["sizes"][str(n)] for n in sizes)
    result["ratio"] = big["ratio"]
    result["rss_growth"] = big["hpcft_logs_peak_rss"] / small["hpcft_logs_peak_rss"]
    result["target"] = "<= 2x grep; peak memory flat in log size"
    return result
