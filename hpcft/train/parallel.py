"""apply_* functions: a bare (or LoRA) model in, an Engine out. Side by side, one per strategy.

    engine = apply_strategy(model, cfg=cfg, rt=rt, total_steps=100, blocks=block_classes(model))
"""
from __future__ import annotations

import json
from importlib import resources

import torch.distributed as dist
from torch import nn

from hpcft.errors import SpecError
from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime
from hpcft.train.engine import TorchEngine, ZeroEngine
from hpcft.train.flops import model_shape
from hpcft.train.loading import WeightLoad, broadcast_from_rank0, materialize_sharded
from hpcft.train.model import is_quantized
from hpcft.train.optim import build_optimizer
from hpcft.train.precision import resolve_precision
from hpcft.train.zero_patches import init_zero_comm, patch_fp32_partitions


def _torch_engine(model: nn.Module, hf_model: nn.Module, cfg: TrainConfig, rt: Runtime, total_steps: int):
    opt, sched = build_optimizer(model, cfg, total_steps)
    return TorchEngine(model, hf_model, opt, sched, accum=cfg.gradient_accumulation_steps,
                       clip=cfg.gradient_clipping_threshold if cfg.gradient_clipping else None,
                       precision=resolve_precision(cfg.precision), device=rt.device, peft=cfg.use_peft)


def apply_ddp(model: nn.Module, *, cfg: TrainConfig, rt: Runtime, total_steps: int):
    from torch.nn.parallel import DistributedDataParallel

    if not is_quantized(model):  # bitsandbytes weights were placed on this GPU as they loaded
        model = model.to(rt.device)
    wrapped = model
    if rt.env.distributed:
        # Gradients as views into the all-reduce buckets: one copy of the gradients, not two. No buffer
        # sync in forward: an LLM's buffers (rotary inv_freq) are computed alike on every rank, and without it the
        # forward runs no collective, so a rank's forward time is its own (rankstats: stragglers).
        wrapped = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                          gradient_as_bucket_view=True, forward_sync_buffers=False)
    return _torch_engine(wrapped, model, cfg, rt, total_steps)


def build_mesh(rt: Runtime, sharding: str):
    """1-D mesh for FULL_SHARD / SHARD_GRAD_OP; 2-D (replicate, shard) for HYBRID_SHARD (shard within a
    node, replicate across nodes) and NO_SHARD (shard groups of one: plain replication)."""
    from torch.distributed.device_mesh import init_device_mesh

    world, local = rt.env.world_size, rt.env.local_world_size
    if sharding == "HYBRID_SHARD":
        if world % local:
            raise SpecError("train.sharding_strategy", f"HYBRID_SHARD needs the same ranks on every node "
                                                       f"(world {world}, {local} on this node)")
        return init_device_mesh(rt.device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))
    if sharding == "NO_SHARD":
        return init_device_mesh(rt.device.type, (world, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(rt.device.type, (world,), mesh_dim_names=("shard",))


def mesh_groups(mesh) -> dict[str, list[int]]:
    """The global ranks in this rank's group along each mesh dimension (logged, and checked by tests)."""
    return {name: sorted(dist.get_process_group_ranks(mesh.get_group(name))) for name in mesh.mesh_dim_names}


def shard_fsdp(model: nn.Module, *, cfg: TrainConfig, rt: Runtime, blocks: set[type],
               load: WeightLoad | None = None) -> nn.Module:
    """FSDP2 (fully_shard) per transformer block, then the root, with the weights in place: a meta-device
    model gets each rank's rows from the files (load.mode sharded) or rank 0's weights by broadcast (rank0);
    a loaded one is moved to the device and sharded (full)."""
    from torch.distributed.fsdp import fully_shard

    mode = load.mode if load is not None else "full"
    mesh = build_mesh(rt, cfg.sharding_strategy)
    reshard = cfg.sharding_strategy != "SHARD_GRAD_OP"
    if mode == "full":
        model = model.to(rt.device)
    full_state = model.state_dict() if mode == "rank0" and rt.is_main else None  # rank 0's, before sharding
    for module in list(model.modules()):
        if type(module) in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    if mode == "sharded":
        materialize_sharded(model, load.weights, rt.device, cfg.seed)
    elif mode == "rank0":
        broadcast_from_rank0(model, full_state, rt)
        del full_state
    print(f"hpcft.fsdp: rank {rt.env.rank} {cfg.sharding_strategy} mesh {json.dumps(mesh_groups(mesh))}", flush=True)
    return model


def apply_fsdp(model: nn.Module, *, cfg: TrainConfig, rt: Runtime, total_steps: int, blocks: set[type]):
    """shard_fsdp unless the model came sharded (build_session shards as the weights load), then the
    optimizer and engine."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        model = shard_fsdp(model, cfg=cfg, rt=rt, blocks=blocks)
    return _torch_engine(model, model, cfg, rt, total_steps)


def deepspeed_config(cfg: TrainConfig, rt: Runtime, stage: int, hidden_size: int = 0) -> dict:
    """The repo's ds_zero<N>.json (or the user's file) with every "auto" filled from the spec. ZeRO-3's
    reduce bucket follows the model's hidden size as the HF DeepSpeed integration sizes it (hidden^2):
    a fixed 5e8-element bucket is a 2 GB buffer per rank, five times a 27M model's whole state."""
    if cfg.deepspeed_config:
        try:
            with open(cfg.deepspeed_config) as f:
                conf = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError("train.deepspeed_config", f"cannot read {cfg.deepspeed_config}: {exc}") from None
    else:
        conf = json.loads(resources.files("hpcft.configs").joinpath(f"ds_zero{stage}.json").read_text())
    offload_opt = "cpu" if cfg.offload_optimizer else "none"
    auto = {
        "train_micro_batch_size_per_gpu": cfg.batch_size_training,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.batch_size_training * cfg.gradient_accumulation_steps * rt.env.world_size,
        "gradient_clipping": cfg.gradient_clipping_threshold if cfg.gradient_clipping else 0.0,
        "bf16.enabled": cfg.precision in ("bf16", "pure_bf16"),
        "fp16.enabled": cfg.precision == "fp16",
        "zero_optimization.offload_optimizer.device": offload_opt,
        "zero_optimization.offload_param.device": "cpu" if cfg.offload_params else "none",
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size if hidden_size else 5e8,
        # Smaller prefetch buckets (HF's 0.9 x hidden^2) left parameters in flight at export
        # ("Cannot partition a param in flight", ZeRO-3 + offload): kept large.
        "zero_optimization.stage3_prefetch_bucket_size": 5e8,
        "zero_optimization.stage3_param_persistence_threshold": 1e4,
    }
    _fill_auto(conf, auto, "")
    conf.setdefault("zero_optimization", {})["stage"] = stage
    return conf


def _fill_auto(node: dict, auto: dict, prefix: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _fill_auto(value, auto, dotted + ".")
        elif value == "auto":
            if dotted not in auto:
                raise SpecError("train.deepspeed_config", f'"{dotted}": "auto" is not a field hpcft can fill; set a value')
            node[key] = auto[dotted]


def apply_zero(model: nn.Module, *, cfg: TrainConfig, rt: Runtime, total_steps: int):
    import deepspeed

    stage = int(cfg.strategy[-1])
    conf = deepspeed_config(cfg, rt, stage, hidden_size=model_shape(model.config)[1])
    init_zero_comm(rt.backend)
    if stage == 3 and patch_fp32_partitions() and rt.is_main:
        print("hpcft.zero: ZeRO-3 reuses fp32 partitions as its fp32 master copy (DeepSpeed compares a device with "
              "a string there and would keep a second copy; hpcft.train.zero_patches)", flush=True)
    if not hasattr(next(model.parameters()), "ds_id"):  # zero.Init partitioned it as it loaded (hpcft.train.loading)
        model = model.to(rt.device)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=conf,
                                           dist_init_required=False)
    return ZeroEngine(engine, model, stage=stage, device=rt.device)


def apply_strategy(model: nn.Module, *, cfg: TrainConfig, rt: Runtime, total_steps: int, blocks: set[type]):
    """cfg.strategy's apply_* with the options it takes."""
    if cfg.strategy == "fsdp":
        return apply_fsdp(model, cfg=cfg, rt=rt, total_steps=total_steps, blocks=blocks)
    if cfg.strategy == "ddp":
        return apply_ddp(model, cfg=cfg, rt=rt, total_steps=total_steps)
    return apply_zero(model, cfg=cfg, rt=rt, total_steps=total_steps)
