"""Model and tokenizer from a local directory, plus what is applied to the bare model before any
parallelism: LoRA adapters, activation checkpointing, dtype."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from hpcft.errors import SpecError
from hpcft.train.config import TrainConfig


def check_model_dir(cfg: TrainConfig) -> None:
    if not (Path(cfg.model_name) / "config.json").is_file():
        raise SpecError("train.model_name", f"no model directory with config.json at {cfg.model_name!r}; "
                                            f"build one with: hpcft make-tiny-model {cfg.model_name}")


def check_quantization(cfg: TrainConfig) -> None:
    """QLoRA / int8 need CUDA and bitsandbytes; say so before training starts."""
    if cfg.quantization is None:
        return
    if not torch.cuda.is_available():
        raise SpecError("train.quantization", f"{cfg.quantization} weights need a CUDA GPU (bitsandbytes); "
                                              "this node has none: drop quantization or run on GPU nodes")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SpecError("train.quantization", "needs the bitsandbytes package: pip install bitsandbytes") from None


def model_class(seq2seq: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM


def load_model(cfg: TrainConfig, *, seq2seq: bool, dtype: torch.dtype, device: torch.device | None = None) -> nn.Module:
    """from_pretrained(path), the whole model (hpcft.train.loading decides who calls it). Quantized weights
    are placed on this rank's GPU as they load (bitsandbytes models cannot be moved afterwards)."""
    cls = model_class(seq2seq)
    kwargs: dict = {"attn_implementation": cfg.attn_implementation}
    if cfg.quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.quantization == "4bit", load_in_8bit=cfg.quantization == "8bit",
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        kwargs["device_map"] = {"": device.index if device is not None and device.index is not None else 0}
    return cls.from_pretrained(cfg.model_name, local_files_only=True, dtype=dtype, **kwargs)


def is_quantized(model: nn.Module) -> bool:
    """Weights loaded through a quantizer (bitsandbytes): already on their GPU, and never .to()'d."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None)


def apply_lora(model: nn.Module, cfg: TrainConfig, *, seq2seq: bool) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.lora_target_modules if m not in names]
    if missing:
        raise SpecError("train.lora_target_modules", f"no module named {', '.join(missing)} in this model; "
                                                     f"linear layers here include e.g. {', '.join(sorted(names & _LINEAR_HINT))}")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), bias="none",
                        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM)
    return get_peft_model(model, config)


ADAPTERS = (".lora_A.", ".lora_B.")


def is_adapter(name: str) -> bool:
    return any(a in name for a in ADAPTERS)


def adapter_init(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default LoRA initialisation (A Kaiming-uniform, B zeros: the adapter starts as a no-op),
    drawn from hpcft's own generator so that every strategy and loading path starts from the same adapters."""
    full = torch.empty(shape)
    if ".lora_A." in name:
        return nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
    return full.zero_()


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Every LoRA weight of a model with real parameters from adapter_init, in parameter order (the
    order hpcft.train.loading fills a sharded model's adapters in)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if is_adapter(name):
            param.copy_(adapter_init(name, param.shape, generator))


_LINEAR_HINT = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"}


def apply_activation_checkpointing(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = False
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5's name; the older one warns there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # LoRA: frozen embeddings would cut the graph


def apply_compile(model: nn.Module, blocks: set[type]) -> int:
    """Regional compilation, as torchtitan does it: torch.compile each transformer block (the model's
    _no_split_modules) rather than the whole model: blocks share one compiled graph, compile time stays
    that of one block, and FSDP's per-block units and activation checkpointing wrap compiled code.
    Returns the number of blocks compiled."""
    n = 0
    for module in model.modules():
        if type(module) in blocks:
            module.compile(dynamic=True)  # batches vary in length: one dynamic graph, not a recompile per shape
            n += 1
    return n


def block_classes(model: nn.Module) -> set[type]:
    """Transformer block classes (one FSDP unit each): the model's own _no_split_modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def count_params(model: nn.Module) -> tuple[int, int]:
    """Whole-model counts, also of a ZeRO-3 partitioned model (whose tensors are empty: ds_numel)."""
    def numel(p):
        return getattr(p, "ds_numel", None) or p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable
