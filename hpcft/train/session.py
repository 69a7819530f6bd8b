"""Build everything a training run holds, in one place: tokenizer, data, loaders, model, engine, and
the state to resume from. The steps that use it (train, evaluate, export, summarize) are in
hpcft.train.run; benchmarks build the same Session to measure what users run.

    session = build_session(cfg, rt, RunPaths(run_dir))
    session.engine.backward(...); session.engine.step()
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hpcft.paths import RunPaths
from hpcft.train.checkpoint import RunShape, TrainerState, agree_on_resume, load_checkpoint
from hpcft.train.config import TrainConfig
from hpcft.train.data import Splits, load_splits, make_eval_loader, make_loader, prepare_once
from hpcft.train.dist import Runtime, gather_per_rank, print0
from hpcft.train.flops import model_shape, peak_flops
from hpcft.train.loop import FlopsModel, plan_steps
from hpcft.prepare import is_seq2seq, load_tokenizer
from hpcft.memstat import PrivateMemoryPeak, large_frees_returned, rss_mib
from hpcft.train.loading import WEIGHT_MODES, load_weights, warm_imports
from hpcft.train.model import (apply_activation_checkpointing, apply_compile, apply_lora, block_classes, count_params,
                               init_adapters)
from hpcft.train.parallel import apply_strategy, deepspeed_config, shard_fsdp
from hpcft.train.precision import Precision, apply_tf32, resolve_precision
from hpcft.worldplan import SavedRun, adapt, read_saved


@dataclass
class Data:
    """Tokenized splits and this rank's loaders, and the step plan they give."""

    tokenizer: object
    splits: Splits
    train_loader: DataLoader
    eval_loader: DataLoader | None  # None when run_validation is off or there is no eval split
    seq2seq: bool
    steps_per_epoch: int
    total_steps: int


@dataclass
class Session:
    """What one rank trains with. Holds the process group through the engine: drop it before
    destroying the group."""

    cfg: TrainConfig
    rt: Runtime
    paths: RunPaths
    data: Data
    precision: Precision
    engine: object  # TorchEngine or ZeroEngine (hpcft.train.engine)
    n_params: int
    n_trainable: int
    flops: FlopsModel
    state: TrainerState  # where training starts: fresh, or loaded from resume_from
    resume_from: Path | None
    adaptation: str | None  # how the resume was adapted to this world size (None: fresh start)
    load_memory: dict | None = None  # load_memory_report: what loading the weights cost each rank

    @property
    def shape(self) -> RunShape:
        cfg = self.cfg
        return RunShape(self.rt.env.world_size, cfg.batch_size_training, cfg.gradient_accumulation_steps,
                        self.data.total_steps, cfg.strategy, cfg.use_peft)


@dataclass(frozen=True)
class Resume:
    path: Path
    saved: SavedRun
    adaptation: str


def plan_resume(cfg: TrainConfig, rt: Runtime, paths: RunPaths) -> tuple[TrainConfig, Resume | None]:
    """The checkpoint cfg.resume names (every rank agrees on one), and cfg with the gradient
    accumulation that keeps its global batch on this world size (hpcft.worldplan)."""
    path = agree_on_resume(cfg.resume, paths, rt)
    if path is None:
        return cfg, None
    saved = read_saved(path)
    plan = adapt(saved, world_size=rt.env.world_size, micro_batch=cfg.batch_size_training,
                 accum=cfg.gradient_accumulation_steps, strategy=cfg.strategy, use_peft=cfg.use_peft)
    if plan.accum != cfg.gradient_accumulation_steps:
        cfg = dataclasses.replace(cfg, gradient_accumulation_steps=plan.accum)
    return cfg, Resume(path, saved, plan.describe())


def data_cache_root(cfg: TrainConfig, paths: RunPaths) -> Path:
    return Path(cfg.data_cache_dir) if cfg.data_cache_dir else paths.data_cache


def build_data(cfg: TrainConfig, rt: Runtime, paths: RunPaths) -> Data:
    """The job's data tokenized once (prepare_once), memory-mapped on this rank, and its loaders."""
    env = rt.env
    seq2seq = is_seq2seq(cfg)
    tokenizer = load_tokenizer(cfg)
    prepared = prepare_once(cfg, rt, data_cache_root(cfg, paths))
    splits = load_splits(cfg, prepared, seq2seq=seq2seq)
    attn = cfg.attn_implementation
    train_loader = make_loader(splits.train, batch_size=cfg.batch_size_training,
                               accum=cfg.gradient_accumulation_steps, shuffle=True, rank=env.rank,
                               world_size=env.world_size, seed=cfg.seed, pad_id=tokenizer.pad_token_id,
                               num_workers=cfg.num_workers_dataloader, attn_implementation=attn)
    eval_loader = (make_eval_loader(splits.eval, batch_size=cfg.val_batch_size, rank=env.rank,
                                    world_size=env.world_size, pad_id=tokenizer.pad_token_id, attn_implementation=attn)
                   if splits.eval is not None and cfg.run_validation else None)
    sampler = train_loader.batch_sampler
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = plan_steps(cfg, steps_per_epoch)
    rows = splits.train
    packed = f" in {len(rows):,} packed rows ({cfg.packing_mode})" if cfg.batching_strategy == "packing" else ""
    print0(rt, f"hpcft.train: {rows.examples:,} train examples ({splits.form}, {cfg.batching_strategy}){packed}, "
               f"global batch {sampler.global_batch} (micro-batch {cfg.batch_size_training} x accumulation "
               f"{cfg.gradient_accumulation_steps} x {env.world_size} rank(s)), {steps_per_epoch} steps per epoch, "
               f"{total_steps} steps in all")
    return Data(tokenizer, splits, train_loader, eval_loader, seq2seq, steps_per_epoch, total_steps)


def build_session(cfg: TrainConfig, rt: Runtime, paths: RunPaths, *, data: Data | None = None) -> Session:
    """Data (unless given), model (LoRA, activation checkpointing), the strategy's engine, and the
    checkpoint named by cfg.resume loaded into it, on this world size whatever the saved one."""
    torch.manual_seed(cfg.seed)
    cfg, resume = plan_resume(cfg, rt, paths)
    if data is None or data.train_loader.batch_sampler.accum != cfg.gradient_accumulation_steps:
        data = build_data(cfg, rt, paths)
    precision = resolve_precision(cfg.precision)
    warm_imports(cfg)
    with large_frees_returned(), PrivateMemoryPeak(interval=0.02, measure=rss_mib) as memory:  # what loading costs
        loaded = load_weights(cfg, rt, seq2seq=data.seq2seq, dtype=precision.param_dtype,
                              zero_config=zero3_config(cfg, rt) if cfg.strategy == "zero3" else None)
        model = loaded.model
        if cfg.use_peft:
            model = apply_lora(model, cfg, seq2seq=data.seq2seq)
            targets = model.peft_config["default"].target_modules
            print0(rt, f"hpcft.train: LoRA r={cfg.lora_r} on {targets if isinstance(targets, str) else ', '.join(sorted(targets))}"
                       + ("" if cfg.lora_target_modules else f" (the default for {model.config.model_type})"))
            if loaded.mode != "sharded":  # a sharded model's adapters are drawn alike as its shards fill
                init_adapters(model, cfg.seed)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        blocks = block_classes(model)
        if cfg.compile:
            compiled = apply_compile(model, blocks)
            print0(rt, f"hpcft.train: torch.compile on {compiled} transformer block(s) (regional; the first steps "
                       "compile)")
        n_params, n_trainable = count_params(model)
        n_layers, hidden = model_shape(model.config)
        if cfg.strategy == "fsdp":
            model = shard_fsdp(model, cfg=cfg, rt=rt, blocks=blocks, load=loaded)
    load_memory = load_memory_report(rt, loaded.mode, memory, n_params * precision.param_dtype.itemsize)
    engine = apply_strategy(model, cfg=cfg, rt=rt, total_steps=data.total_steps, blocks=blocks)
    del loaded, model
    print0(rt, f"hpcft.train: {n_params:,} parameters, {n_trainable:,} trainable"
               f"{' (LoRA r=%d)' % cfg.lora_r if cfg.use_peft else ''}")
    state = TrainerState()
    if resume is not None:
        state = load_checkpoint(engine, resume.path, rt, saved=resume.saved)
        print0(rt, f"hpcft.train: resumed from {resume.path} at step {state.step} (epoch {state.epoch}, "
                   f"global sample {state.samples_in_epoch}); {resume.adaptation}")
    tf32 = apply_tf32(cfg.precision, cfg.tf32, rt.device)
    if tf32:
        print0(rt, "hpcft.train: TF32 matmuls on (precision fp32 on CUDA; tf32: false keeps exact fp32)")
    peak, peak_source = peak_flops(cfg.peak_tflops, rt.device, precision.autocast_dtype or precision.param_dtype,
                                   tf32=tf32)
    flops = FlopsModel(n_params, n_layers, hidden, peak, peak_source)
    return Session(cfg, rt, paths, data, precision, engine, n_params, n_trainable, flops, state,
                   resume.path if resume else None, resume.adaptation if resume else None, load_memory)


def zero3_config(cfg: TrainConfig, rt: Runtime) -> dict:
    """The DeepSpeed config apply_zero will use, for zero.Init to partition the model with as it loads."""
    from transformers import AutoConfig

    hidden = model_shape(AutoConfig.from_pretrained(cfg.model_name, local_files_only=True))[1]
    return deepspeed_config(cfg, rt, 3, hidden_size=hidden)


def load_memory_report(rt: Runtime, mode: str, memory: PrivateMemoryPeak, weight_bytes: int) -> dict:
    """Each rank's peak resident memory (RSS: private and file pages) added while the weights loaded and
    were sharded, against one copy of the weights; printed by rank 0 and kept for summary.json."""
    added = gather_per_rank(rt, round(memory.added, 1))
    one_copy = weight_bytes / 2**20
    report = {"mode": mode, "weights_mib": round(one_copy, 1), "added_rss_mib_per_rank": added,
              "sum_over_one_copy": round(sum(added) / one_copy, 2) if one_copy else None}
    print0(rt, f"hpcft.train: weights {WEIGHT_MODES[mode]}; loading added {sum(added):,.0f} MiB of RSS "
               f"over {len(added)} rank(s), {report['sum_over_one_copy']}x one copy of the weights ({one_copy:,.0f} MiB)")
    return report
