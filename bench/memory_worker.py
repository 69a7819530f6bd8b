"""Part 5 worker, run under torchrun: the hpcft strategy code (apply_strategy) on the bench model, two
optimizer steps, and a census of the live tensors on this rank after the second backward, when
parameters, gradients and optimizer state all exist and activations are gone.

    torchrun --standalone --nproc-per-node 2 bench/memory_worker.py OUT.json MODEL DATA STRATEGY SHARDING PRECISION
"""
from __future__ import annotations

import gc
import json
import os
import sys

from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import bench_config


def live_tensor_bytes(model: torch.nn.Module | None = None) -> int:
    """Bytes of every distinct storage behind a live tensor in this process (views and flat buffers
    counted once): all tensors the garbage collector knows, plus the model's parameters and gradients
    (a gradient that lives only in C++, such as a DDP bucket view, has no Python object until asked
    for). DTensors are counted through their local shard."""
    from torch.distributed.tensor import DTensor

    gc.collect()
    extra = []
    if model is not None:
        for p in model.parameters():
            extra += [p, p.grad] if p.grad is not None else [p]
    seen: dict[int, int] = {}
    for obj in list(gc.get_objects()) + extra:
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            if isinstance(obj, DTensor):
                obj = obj.to_local()
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except Exception:  # noqa: BLE001 - wrapper subclasses and freed storages
            continue
        if ptr:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
    return sum(seen.values())


def main() -> None:
    out, model_dir, data, strategy, sharding, precision = sys.argv[1:7]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hpcft.distenv import collect_dist_env
    from hpcft.paths import RunPaths
    from hpcft.train.dist import setup_distributed
    from hpcft.train.loop import to_device
    from hpcft.train.session import build_data, build_session

    cfg = bench_config(model_dir, data, strategy=strategy, sharding_strategy=sharding, precision=precision,
                       max_train_step=10, resume="never")
    rt = setup_distributed(collect_dist_env(), timeout_s=300)
    paths = RunPaths(Path(out).parent / "memory-run")
    data_ = build_data(cfg, rt, paths)
    baseline = live_tensor_bytes()  # before the model: data set tensors, rotary tables of nothing yet
    session = build_session(cfg, rt, paths, data=data_)
    engine, n_params = session.engine, session.n_params
    del session
    it = iter(data_.train_loader)
    census = 0
    for step in range(2):
        batch = next(it)
        with engine.autocast():
            loss = engine.model(**to_device(batch, rt.device)).loss
        engine.backward(loss, boundary=True)
        del loss
        if step == 1:
            census = live_tensor_bytes(engine.model) - baseline
        engine.step()
    values = [None] * rt.env.world_size
    dist.all_gather_object(values, census)
    if rt.is_main:
        with open(out, "w") as f:
            json.dump({"strategy": strategy, "sharding": sharding, "precision": precision, "bytes_per_rank": values, "parameters": n_params}, f)
    del engine
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
