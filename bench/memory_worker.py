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

import torch
import torch.distributed as dist


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
    from hpcft.train.config import TrainConfig
    from hpcft.train.data import load_splits, make_loader
    from hpcft.train.dist import setup_distributed
    from hpcft.train.loop import _to
    from hpcft.train.model import block_classes, load_model, load_tokenizer
    from hpcft.train.parallel import apply_strategy
    from hpcft.train.precision import resolve_precision

    cfg = TrainConfig(model_name=model_dir, data_path=data, dataset="samsum", strategy=strategy,
                      sharding_strategy=sharding, context_length=512, batch_size_training=4,
                      batching_strategy="packing", run_validation=False, precision=precision)
    rt = setup_distributed(collect_dist_env(), timeout_s=300)
    tok = load_tokenizer(cfg)
    splits = load_splits(cfg, tok)
    loader = make_loader(splits.train, batch_size=4, rank=rt.env.rank, world_size=rt.env.world_size, shuffle=True,
                         seed=0, pad_id=tok.pad_token_id, num_workers=0)
    baseline = live_tensor_bytes()  # before the model: data set tensors, rotary tables of nothing yet
    model = load_model(cfg, seq2seq=False, dtype=resolve_precision(precision).param_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    engine = apply_strategy(model, cfg=cfg, rt=rt, total_steps=10, blocks=block_classes(model))
    del model
    it = iter(loader)
    census = 0
    for step in range(2):
        batch = next(it)
        with engine.autocast():
            loss = engine.model(**_to(batch, rt.device)).loss
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
