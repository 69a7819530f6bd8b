"""How each rank gets the pretrained weights without a whole copy per rank (WeightLoad.mode):

full       every rank calls from_pretrained for the whole model: one process, ddp, zero1/2 (each rank holds
           the whole model anyway), quantized weights, and low_cpu_fsdp: false
sharded    fsdp: every rank builds the model on the meta device; after fully_shard each reads only the bytes
           of its own rows of each tensor from the safetensors files
zero_init  zero3: every rank builds the model under deepspeed.zero.Init (each parameter partitioned as its
           module is built) and reads only the bytes of its own partition of each tensor
rank0      fsdp where the files do not name every parameter (.bin weights, renamed keys): rank 0 reads the
           model, the others start on the meta device and get the weights by broadcast after sharding
zero_hf    zero3 where the files do not name every parameter: HF's from_pretrained under zero.Init
           (HfDeepSpeedConfig), rank 0 reading the files and filling the partitions a module at a time

Reads go through plain file reads into the destination tensor, not a memory map: mapped pages of the
weight files would count in every rank's RSS that touched them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime
from hpcft.train.model import adapter_init, attn_implementation, is_adapter, load_model, model_class
from hpcft.train.zero_patches import init_zero_comm

WEIGHT_MODES = {"full": "read whole by every rank", "sharded": "read by each rank for its own shard only",
                "zero_init": "read by each rank for its own ZeRO-3 partition only",
                "rank0": "read by rank 0 and broadcast into the shards",
                "zero_hf": "read by rank 0 into the ZeRO-3 partitions (transformers' loader)"}
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


@dataclass
class WeightLoad:
    model: nn.Module
    mode: str  # WEIGHT_MODES (module docstring)
    weights: "SafetensorsWeights | None" = None  # sharded: where each rank reads its rows
    zero_config: dict | None = None  # zero_init: the DeepSpeed config zero.Init partitioned with


def checkpoint_key(name: str) -> str:
    """A parameter's name in the model's own files: PEFT's wrapper prefix and base_layer removed."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file


class SafetensorsWeights:
    """Where each tensor of a model directory's safetensors weights lies (one file, or an index of
    shards), read by byte range: a run of whole rows is one contiguous read."""

    def __init__(self, entries: dict[str, TensorEntry]):
        self.entries = entries

    @classmethod
    def open(cls, model_dir: str | Path) -> "SafetensorsWeights | None":
        root = Path(model_dir)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (root / "model.safetensors").is_file():
            files = [root / "model.safetensors"]
        else:
            return None
        entries: dict[str, TensorEntry] = {}
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key != "__metadata__" and info["dtype"] in SAFETENSORS_DTYPES:
                    entries[key] = TensorEntry(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                               8 + size + info["data_offsets"][0])
        return cls(entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def missing(self, model: nn.Module) -> list[str]:
        """Parameters (under any of their tied names) that the files do not hold, adapters aside."""
        return [names[0] for names in tied_names(model)
                if not is_adapter(names[0]) and not any(checkpoint_key(n) in self.entries for n in names)]

    def key_for(self, names: list[str]) -> str:
        for n in names:
            if checkpoint_key(n) in self.entries:
                return checkpoint_key(n)
        raise KeyError(f"no tensor for {names[0]} in the model's safetensors files")

    def read_flat(self, key: str, start: int, out: torch.Tensor) -> None:
        """Elements start .. start + out.numel() of the tensor, in row-major order, into out (any device,
        any float dtype): read straight into out's memory where it is a contiguous CPU tensor of the
        file's dtype, else through a buffer of the same size."""
        entry = self.entries[key]
        count = out.numel()
        if count == 0:
            return
        if start < 0 or start + count > math.prod(entry.shape):
            raise ValueError(f"{key}: elements {start}..{start + count} of a {entry.shape} tensor")
        direct = out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous()
        target = out if direct else torch.empty(count, dtype=entry.dtype)
        view = memoryview(target.view(-1).view(torch.uint8).numpy())
        itemsize = target.element_size()
        with open(entry.path, "rb", buffering=0) as f:
            f.seek(entry.offset + start * itemsize)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{entry.path}: ends inside {key}")
                done += n
        if not direct:
            out.view(-1).copy_(target)

    def read_rows(self, key: str, index: tuple[slice, ...], out: torch.Tensor) -> None:
        """The block `index` of the tensor into out; one read when only the first dimension is cut."""
        entry = self.entries[key]
        if any((s.start, s.stop) != (0, n) for s, n in zip(index[1:], entry.shape[1:])):
            from safetensors import safe_open  # columns cut too: through safetensors' slicing

            with safe_open(entry.path, framework="pt") as f:
                out.copy_(f.get_slice(key)[index])
            return
        row = math.prod(entry.shape[1:])
        self.read_flat(key, (index[0].start if index else 0) * row, out)


def tied_names(model: nn.Module) -> list[list[str]]:
    """Every parameter once, with all the names it goes by (tied embeddings have two)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def choose_mode(cfg: TrainConfig, rt: Runtime) -> str:
    """full, or the mode to try first (sharded / zero_init) when the files allow it."""
    if not rt.env.distributed or cfg.quantization:
        return "full"
    if cfg.strategy == "fsdp" and cfg.low_cpu_fsdp is not False:
        return "sharded"
    if cfg.strategy == "zero3" and cfg.zero3_init_flag:
        return "zero_init"
    return "full"


def load_weights(cfg: TrainConfig, rt: Runtime, *, seq2seq: bool, dtype: torch.dtype,
                 zero_config: dict | None = None) -> WeightLoad:
    """The base model for this run's strategy, before LoRA and sharding (see the module docstring)."""
    mode = choose_mode(cfg, rt)
    if mode == "full":
        return WeightLoad(load_model(cfg, seq2seq=seq2seq, dtype=dtype, device=rt.device), mode)
    model = build_on_meta(cfg, seq2seq=seq2seq, dtype=dtype)
    weights = SafetensorsWeights.open(cfg.model_name)
    missing = weights.missing(model) if weights is not None else ["any tensor (no model.safetensors)"]
    if not missing:
        if mode == "sharded":
            return WeightLoad(model, mode, weights=weights)
        del model
        model = build_under_zero_init(cfg, rt, seq2seq=seq2seq, dtype=dtype, zero_config=zero_config)
        fill_zero_partitions(model, weights)
        return WeightLoad(model, mode, zero_config=zero_config)
    fallback = "rank0" if mode == "sharded" else "zero_hf"
    if rt.is_main:
        print(f"hpcft.train: weights {WEIGHT_MODES[fallback]}: the safetensors files do not name {missing[0]}"
              f"{' and %d more' % (len(missing) - 1) if len(missing) > 1 else ''}", flush=True)
    if fallback == "zero_hf":
        return WeightLoad(load_under_hf_zero(cfg, rt, seq2seq=seq2seq, dtype=dtype, zero_config=zero_config),
                          fallback, zero_config=zero_config)
    if rt.is_main:
        model = load_model(cfg, seq2seq=seq2seq, dtype=dtype, device=rt.device)
    return WeightLoad(model, fallback)


def warm_imports(cfg: TrainConfig) -> None:
    """The libraries loading uses, imported before its memory is measured (code is not weights)."""
    import accelerate  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from transformers import AutoConfig

    if cfg.strategy.startswith("zero"):
        import deepspeed  # noqa: F401
    config = AutoConfig.from_pretrained(cfg.model_name, local_files_only=True)
    for seq2seq in (False, True):
        try:
            model_class(seq2seq)._model_mapping[type(config)]  # imports the model's own module
        except (KeyError, ValueError, AttributeError):
            pass


def _from_config(cfg: TrainConfig, *, seq2seq: bool, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model_name, local_files_only=True)
    return model_class(seq2seq).from_config(config, dtype=dtype,
                                            attn_implementation=attn_implementation(cfg, config, seq2seq=seq2seq))


def build_on_meta(cfg: TrainConfig, *, seq2seq: bool, dtype: torch.dtype) -> nn.Module:
    """The architecture with parameters on the meta device and buffers real: rotary frequencies and the
    like are computed by the model's own __init__ and are in no weight file."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = _from_config(cfg, seq2seq=seq2seq, dtype=dtype)
    # init_empty_weights re-registers every parameter as a new meta tensor, which unties tied embeddings
    # (lm_head and embed_tokens became two parameters, one named in no file: Llama 3.2, Qwen2.5, Gemma, GPT-2
    # went to rank 0's read and then failed the broadcast). Tied again here, as the loaded model is.
    model.tie_weights()
    return model


def build_under_zero_init(cfg: TrainConfig, rt: Runtime, *, seq2seq: bool, dtype: torch.dtype,
                          zero_config: dict) -> nn.Module:
    """The architecture under deepspeed.zero.Init: each module's parameters partitioned across the ranks
    as soon as it is built (a module's worth of memory at a time), with the config apply_zero uses."""
    import deepspeed

    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    init_zero_comm(rt.backend)
    # As transformers' own ZeRO-3 path builds: no weight init on the empty partitions (the files fill them),
    # rotary buffers kept in fp32 under zero.Init's dtype casting.
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=zero_config):
        model = _from_config(cfg, seq2seq=seq2seq, dtype=dtype)
    model.tie_weights()  # as on the meta device (build_on_meta): the output layer shares the embedding's partition
    return model


@torch.no_grad()
def fill_zero_partitions(model: nn.Module, weights: SafetensorsWeights) -> None:
    """Each ZeRO-3 parameter's partition on this rank (elements [rank x size, +size) of the flattened
    tensor, zero padding past its end) read from the files."""
    for names in tied_names(model):
        param = model.get_parameter(names[0])
        part = param.ds_tensor
        start = part.ds_numel * dist.get_rank(group=param.ds_process_group)
        count = max(0, min(part.ds_numel, param.ds_numel - start))
        weights.read_flat(weights.key_for(names), start, part.view(-1).narrow(0, 0, count))


def load_under_hf_zero(cfg: TrainConfig, rt: Runtime, *, seq2seq: bool, dtype: torch.dtype,
                       zero_config: dict) -> nn.Module:
    """from_pretrained with HF's DeepSpeed integration switched on for the call: under zero.Init."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    init_zero_comm(rt.backend)
    marker = HfDeepSpeedConfig(zero_config)  # transformers holds only a weak reference: keep this one alive
    try:
        model = load_model(cfg, seq2seq=seq2seq, dtype=dtype, device=rt.device)
    finally:
        unset_hf_deepspeed_config()
        del marker
    return model


def local_index(param: torch.Tensor) -> tuple[slice, ...]:
    """The rows (and columns) of the whole tensor that this rank's shard of a DTensor holds, as
    torch.chunk cuts each sharded dimension along its mesh dimension; the whole tensor otherwise."""
    from torch.distributed.tensor import DTensor

    bounds = [[0, n] for n in param.shape]
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        for mesh_dim, placement in enumerate(param.placements):
            if placement.is_shard():
                lo, hi = bounds[placement.dim]
                chunk = math.ceil((hi - lo) / mesh.size(mesh_dim))
                start = min(lo + mesh.get_local_rank(mesh_dim) * chunk, hi)
                bounds[placement.dim] = [start, min(start + chunk, hi)]
    return tuple(slice(a, b) for a, b in bounds)


@torch.no_grad()
def materialize_sharded(model: nn.Module, weights: SafetensorsWeights, device: torch.device, seed: int) -> None:
    """After fully_shard on a meta-device model: local shards allocated on `device` and filled from the
    files, this rank's rows only; LoRA adapters initialised the same on every rank (from `seed`); buffers
    as the model's __init__ made them, or from the files where they are there."""
    from torch.distributed.tensor import DTensor

    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    generator = torch.Generator().manual_seed(seed)
    for names in tied_names(model):
        param = model.get_parameter(names[0])
        local = param.to_local() if isinstance(param, DTensor) else param
        index = local_index(param)
        if tuple(s.stop - s.start for s in index) != tuple(local.shape):
            raise RuntimeError(f"hpcft: {names[0]}: shard {tuple(local.shape)} is not rows {index} of {tuple(param.shape)}")
        if is_adapter(names[0]):
            local.copy_(adapter_init(names[0], param.shape, generator)[index])
        else:
            weights.read_rows(weights.key_for(names), index, local)
    for name, buf in model.named_buffers():
        key = checkpoint_key(name)
        if key in weights:
            weights.read_flat(key, 0, buf)
        elif name in buffers:
            buf.copy_(buffers[name])


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module, full_state: dict | None, rt: Runtime) -> None:
    """After fully_shard: rank 0's weights (full_state) into every rank's shards; the others start on the
    meta device. Non-persistent buffers (rotary frequencies) are in no state dict: rank 0's are sent."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if rt.is_main else {}
    if not rt.is_main:
        model.to_empty(device=rt.device)
    set_model_state_dict(model, full_state if rt.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in model.named_buffers():
        if rt.is_main:
            buf.copy_(buffers[name])
        dist.broadcast(buf.data, src=0)
