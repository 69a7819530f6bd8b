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


def attn_implementation(cfg: TrainConfig, config, *, seq2seq: bool) -> str:
    """cfg.attn_implementation, except that sdpa becomes eager for a family transformers has no sdpa path for
    (Gemma 2: its logits soft-capping), where asking for sdpa would stop every rank at model build."""
    if cfg.attn_implementation != "sdpa":
        return cfg.attn_implementation
    try:
        cls = model_class(seq2seq)._model_mapping[type(config)]
    except (KeyError, ValueError, AttributeError):
        return cfg.attn_implementation
    return "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"


def load_model(cfg: TrainConfig, *, seq2seq: bool, dtype: torch.dtype, device: torch.device | None = None) -> nn.Module:
    """from_pretrained(path), the whole model (hpcft.train.loading decides who calls it). Quantized weights
    are placed on this rank's GPU as they load (bitsandbytes models cannot be moved afterwards)."""
    from transformers import AutoConfig

    cls = model_class(seq2seq)
    config = AutoConfig.from_pretrained(cfg.model_name, local_files_only=True)
    kwargs: dict = {"attn_implementation": attn_implementation(cfg, config, seq2seq=seq2seq)}
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


# A family peft's table does not know (Phi-3 in peft 0.21): its attention projections under the names families
# give them, the first pattern the model's linear layers all hold.
ATTENTION_PROJECTIONS = (("q_proj", "v_proj"), ("qkv_proj",), ("c_attn",), ("query_key_value",), ("Wqkv",),
                         ("W_pack",), ("q", "v"), ("query", "value"))


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str] | str:
    """What peft is told to adapt: the names given (each must name a linear layer of this model), "all-linear"
    (peft's meaning: every linear layer but the output one), or, when none are given, the family's attention
    projections from peft's own table by model_type. SpecError naming the model's linear layers otherwise."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linear = linear_leaf_names(base)
    if targets == ("all-linear",):
        return "all-linear"
    if not targets:
        model_type = getattr(base.config, "model_type", None)
        if model_type in DEFAULTS:
            return list(DEFAULTS[model_type])
        found = next((list(p) for p in ATTENTION_PROJECTIONS if set(p) <= set(linear)), None)
        if found is None:
            raise SpecError("train.lora_target_modules", f"no default for model_type {model_type!r}; name the modules "
                                                         f"to adapt (its linear layers: {', '.join(linear)}) or all-linear")
        return found
    full = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    missing = [t for t in targets if t not in linear and not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        raise SpecError("train.lora_target_modules", f"no linear layer named {', '.join(missing)} in this model; "
                                                     f"its linear layers: {', '.join(linear)} (or all-linear)")
    return list(targets)


def linear_leaf_names(model: nn.Module) -> list[str]:
    """The last name part of every linear layer (nn.Linear, GPT-2's Conv1D), in model order, the output one aside."""
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not out_layer]
    return list(dict.fromkeys(names))


def apply_lora(model: nn.Module, cfg: TrainConfig, *, seq2seq: bool) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=lora_targets(model, cfg.lora_target_modules), bias="none",
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
