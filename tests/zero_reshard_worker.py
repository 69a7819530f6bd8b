"""One rank of the ZeRO reshard experiment (run under torchrun; tests/test_zero_reshard.py drives it).

    ref:    train N steps, checkpoint to <root>/zero<stage>/step-N, train M more (the reference losses)
    resume: load that checkpoint on this (different) world size, train the same M steps

Every global batch is the same whatever the world size: GLOBAL rows of a seeded random batch, split
into micro-batches of MICRO rows; chunk j goes to rank j % world at micro-step j // world, so
micro x accumulation x world = GLOBAL always. Losses are the global mean over the chunks (fp32).
--control spoils one piece of the loaded state (Adam moments and step, or the LR schedule), to show
what the comparison catches; --offload runs DeepSpeedCPUAdam (ZeRO-2/3).

    torchrun --standalone --nproc-per-node 4 tests/zero_reshard_worker.py --phase ref --root R --out ref.json
    torchrun --standalone --nproc-per-node 2 tests/zero_reshard_worker.py --phase resume --root R --out res.json
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist

from hpcft.distenv import collect_dist_env
from hpcft.paths import CheckpointPaths
from hpcft.train.config import TrainConfig
from hpcft.train.dist import setup_distributed
from hpcft.train.parallel import apply_zero

GLOBAL, MICRO, SEQ, VOCAB = 8, 2, 16, 96


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same initial weights on every rank and every world size
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                       tie_word_embeddings=False)
    return LlamaForCausalLM(conf)


def global_batch(step: int) -> torch.Tensor:
    """Arithmetic sequences (random start and stride): learnable, so the loss moves within a few steps
    and a lost optimizer or scheduler state shows."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def train_steps(engine, first: int, last: int, rank: int, world: int) -> list[dict]:
    chunks = GLOBAL // MICRO
    accum = chunks // world
    out = []
    for step in range(first, last):
        batch = global_batch(step)
        total = torch.zeros(1, dtype=torch.float64)
        for micro in range(accum):
            j = micro * world + rank
            ids = batch[j * MICRO:(j + 1) * MICRO]
            loss = engine.model(input_ids=ids, labels=ids).loss
            total += loss.detach().double()
            engine.backward(loss, boundary=micro == accum - 1)
        lr = engine.lr()  # the rate this step uses (the scheduler steps after)
        engine.step()
        dist.all_reduce(total)
        out.append({"step": step + 1, "loss": total.item() / chunks, "lr": lr,
                    "global_steps": engine.model.global_steps})
    return out


def spoil(engine, control: str) -> None:
    if control == "fresh_adam":  # what a freshly built optimizer holds: no moments, step 0
        for state in engine.model.optimizer.optimizer.state.values():
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
    elif control == "sched_reset":  # the schedule restarted at step 0
        sched = engine.model.lr_scheduler
        sched.last_epoch, sched._step_count = -1, 0
        sched.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["ref", "resume"], required=True)
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--root", required=True)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--m", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", default="fp32", help="bf16 works too, with bf16-sized differences")
    ap.add_argument("--offload", action="store_true", help="optimizer state in CPU memory (DeepSpeedCPUAdam)")
    ap.add_argument("--control", choices=["none", "fresh_adam", "sched_reset"], default="none",
                    help="after loading, throw away a piece of state (shows what the comparison catches)")
    args = ap.parse_args()

    rt = setup_distributed(collect_dist_env(), timeout_s=300)
    rank, world = rt.env.rank, rt.env.world_size
    results = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        cfg = TrainConfig(strategy=f"zero{stage}", batch_size_training=MICRO,
                          gradient_accumulation_steps=GLOBAL // MICRO // world, lr=1e-2, warmup_steps=1,
                          lr_scheduler="cosine", weight_decay=0.01, gradient_clipping_threshold=1.0,
                          offload_optimizer=args.offload, precision=args.precision)
        engine = apply_zero(tiny_model(), cfg=cfg, rt=rt, total_steps=args.n + args.m)
        ckpt = CheckpointPaths(Path(args.root) / f"zero{stage}" / f"step-{args.n:08d}")
        if args.phase == "ref":
            before = train_steps(engine, 0, args.n, rank, world)
            if rank == 0:
                ckpt.dir.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            engine.save(ckpt, is_main=rank == 0)
            dist.barrier()
            after = train_steps(engine, args.n, args.n + args.m, rank, world)
            results[stage] = {"before": before, "after": after}
        else:
            engine.load(ckpt)
            spoil(engine, args.control)
            results[stage] = {"after": train_steps(engine, args.n, args.n + args.m, rank, world)}
        del engine
        gc.collect()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "stages": results}, indent=1))
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
