"""Login-node checks of the files a job will read, without torch: the DeepSpeed JSON and the model's
linear layers (from its safetensors headers). submit.check_inputs runs them before anything is queued.

    check_deepspeed_json("ds.json")
    check_lora_targets("artifacts/tiny-llama", ("q_proj", "v_proj"))
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from hpcft.errors import SpecError

# Every key (dotted path) of a DeepSpeed config whose "auto" hpcft fills from the spec: the keys of
# the `auto` table in hpcft.train.parallel.deepspeed_config (tests/test_strategy_config.py keeps the two
# in step). An "auto" anywhere else would reach DeepSpeed unfilled, after the queue.
DEEPSPEED_AUTO_FIELDS = (
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
    "bf16.enabled", "fp16.enabled", "zero_optimization.offload_optimizer.device",
    "zero_optimization.offload_param.device", "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
)
FIELD_DS = "train.deepspeed_config"


def check_deepspeed_json(path: str) -> None:
    """The file parses as a JSON object and every "auto" in it is one hpcft fills."""
    try:
        conf = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpecError(FIELD_DS, f"{path} is not UTF-8 text; save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise SpecError(FIELD_DS, f"{path} is not valid JSON at line {exc.lineno} column {exc.colno} "
                                  f"({exc.msg}); fix the syntax there") from None
    if not isinstance(conf, dict):
        raise SpecError(FIELD_DS, f"{path} must hold a JSON object such as hpcft/configs/ds_zero3.json")
    for dotted in _auto_keys(conf, ""):
        if dotted not in DEEPSPEED_AUTO_FIELDS:
            raise SpecError(FIELD_DS, f'{path}: "{dotted}": "auto" is not a field hpcft fills; set a value '
                                      f"(hpcft fills: {', '.join(DEEPSPEED_AUTO_FIELDS)})")


def _auto_keys(node: dict, prefix: str):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"


def weight_shapes(model_dir: str | Path) -> dict[str, list[int]] | None:
    """Every tensor's name and shape, read from the safetensors headers; None when the model has no
    safetensors (pytorch_model.bin only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    return {name: info["shape"] for f in files for name, info in _safetensors_header(f).items()}


def _safetensors_header(path: Path) -> dict[str, dict]:
    """A .safetensors file's tensors: 8 bytes of little-endian header length, then a JSON header."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v for k, v in header.items() if k != "__metadata__"}


EMBEDDING_HINTS = ("embed", "wte", "wpe", "shared", "lm_head", "embed_out")


def linear_leaves(shapes: dict[str, list[int]]) -> list[str]:
    """Last name parts of the modules with a 2-D weight that is no embedding or output layer: the layers a
    LoRA target can name, as the user sees them (q_proj, c_attn, qkv_proj, query_key_value, wi_0 ...)."""
    leaves = [n.rsplit(".", 2)[-2] for n, shape in shapes.items()
              if n.endswith(".weight") and len(shape) == 2 and not any(h in n for h in EMBEDDING_HINTS)]
    return list(dict.fromkeys(leaves))


def check_lora_targets(model_dir: str, targets: tuple[str, ...]) -> None:
    """Every LoRA target named matches a module as peft matches names (the whole name, or its last parts).
    No names (the family's default) and all-linear are resolved on the ranks, where peft's table is."""
    if not targets or "all-linear" in targets:
        return
    try:
        shapes = weight_shapes(model_dir)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise SpecError("train.model_name", f"cannot read the weight names of {model_dir} ({exc}); "
                                            "check its safetensors files") from None
    if shapes is None:
        return  # pytorch_model.bin only: no torch-free way to list modules; the ranks say so
    modules = list(dict.fromkeys(n.rpartition(".")[0] for n in shapes))
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        raise SpecError("train.lora_target_modules", f"{', '.join(missing)} not in {model_dir}; its linear layers: "
                                                     f"{', '.join(linear_leaves(shapes))} (or all-linear)")


EXPORT_MARKERS = ("config.json", "adapter_config.json")  # what an earlier export (model or adapter) holds


def check_export_dir(path: str | None) -> None:
    """train.export_dir can take the final model: a new directory under a writable one, or an earlier export
    (replaced when the run ends). A directory holding anything else is refused: replacing it would delete
    the user's files."""
    if not path:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise SpecError("train.export_dir", f"{path} is a file; name a directory for the model")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).is_file() for m in EXPORT_MARKERS):
        raise SpecError("train.export_dir", f"{path} holds files that are not an earlier model export; name a new "
                                            "or empty directory (the export replaces the directory's contents)")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError("train.export_dir", f"cannot create {path}: {parent} is not writable; choose a directory "
                                            "you can write")
