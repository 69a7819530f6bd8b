"""This machine's own matmul peak per process (one thread each), measured alone and with `n`
processes at once (what each rank of an n-rank run can get), in fp32 and bf16.

    python bench/peak.py 2      # prints JSON
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys


def _measure(dtype_name: str, q) -> None:
    import torch

    torch.set_num_threads(1)
    from hpcft.train.flops import measure_matmul_peak

    dtype = getattr(torch, dtype_name)
    q.put(max(measure_matmul_peak(torch.device("cpu"), dtype, seconds=0.5, n=n) for n in (1024, 2048)))


def peak(dtype_name: str, procs: int) -> float:
    """Mean over the concurrent processes of each one's best matmul FLOP/s."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_measure, args=(dtype_name, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    values = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(values) / len(values)


def main(procs: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    return {f"{dt}_x{n}": peak(dt, n) for dt in ("float32", "bfloat16") for n in sorted({1, procs})}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
