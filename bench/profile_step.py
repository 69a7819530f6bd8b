"""Where a training step's time goes on one rank (torch profiler, self time per op): the share spent in
matrix multiplies bounds the CPU-MFU, whatever else is tuned. And how long one all-reduce of the
model's gradients takes over gloo between two ranks (the cost DDP adds per step).

    python bench/profile_step.py MODEL DATA fp32|bf16 OUT.json [--compile] [--padding]
    torchrun --standalone --nproc-per-node 2 bench/profile_step.py --allreduce N_FLOATS OUT.json
"""
from __future__ import annotations

import json
import os
import sys
import time

from pathlib import Path

import torch

from bench.common import bench_config

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def step_profile(model_dir: str, data: str, precision: str, out: str, *, compile: bool = False,
                 padding: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from hpcft.distenv import DistEnv
    from hpcft.paths import RunPaths
    from hpcft.train.dist import setup_distributed
    from hpcft.train.loop import to_device
    from hpcft.train.session import build_session

    torch.set_num_threads(1)
    rt = setup_distributed(DistEnv(), timeout_s=300)
    cfg = bench_config(model_dir, data, precision=precision, max_train_step=10, compile=compile,
                       **({"batching_strategy": "padding"} if padding else {}))
    s = build_session(cfg, rt, RunPaths(Path(out).parent / "profile-run"))
    engine = s.engine
    it = iter(s.data.train_loader)

    def step():
        batch = next(it)
        with engine.autocast():
            loss = engine.model(**to_device(batch, rt.device)).loss
        engine.backward(loss, boundary=True)
        engine.step()

    for _ in range(4):  # warm-up (compile: the first steps compile); eager and compiled profile the same batches
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(3):
            step()
        wall = time.perf_counter() - t
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(ops.values())
    matmul = sum(v for k, v in ops.items() if k in MATMUL_OPS)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"precision": precision, "compile": compile, "padding": padding, "step_s": wall / 3,
            "matmul_share": matmul / total, "matmul_s": matmul / total * wall / 3,
            "other_s": (1 - matmul / total) * wall / 3,
            "top_ops": [{"op": k, "share": v / total} for k, v in top]}


def allreduce(n: int) -> float:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(n)
    dist.all_reduce(t)
    times = []
    for _ in range(5):
        dist.barrier()
        s = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - s)
    dist.destroy_process_group()
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1] == "--allreduce":
        seconds = allreduce(int(sys.argv[2]))
        if int(os.environ.get("RANK", "0")) == 0:
            with open(sys.argv[3], "w") as f:
                json.dump({"floats": int(sys.argv[2]), "seconds": seconds}, f)
    else:
        with open(sys.argv[4], "w") as f:
            json.dump(step_profile(*sys.argv[1:5], compile="--compile" in sys.argv[5:],
                                   padding="--padding" in sys.argv[5:]), f)
