"""llama-recipes' (llama-cookbook's) command-line names -> TrainConfig fields, so the guides' own lines run
as written:

    torchrun --nnodes 1 --nproc_per_node 4 -m hpcft.train --enable_fsdp --model_name /models/8B \
      --use_peft --peft_method lora --dataset samsum_dataset --save_model --pure_bf16 --output_dir peft-out

Flags are read as llama-recipes' `fire` reads them: `--name value`, `--name=value`, a bare `--flag` is
true and `--noflag` false; `--train_config.X`, `--fsdp_config.X`, `--lora_config.X` and
`--<dataset>.X` name one field of those configs. hpcft's own field names (TrainConfig) are read the same
way. Each llama-recipes name becomes hpcft's field, and `translate` says so in one note per name, which
rank 0 logs once (and `hpcft submit` prints). A name hpcft cannot honour is refused with a SpecError that
names hpcft's nearest field.

Pure: no torch, no file access; TrainConfig's field names and types come in as arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from hpcft.errors import SpecError
from hpcft.paths import recipes_model_dir

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
RECIPE_DATASETS = {"samsum_dataset": "samsum", "alpaca_dataset": "alpaca", "grammar_dataset": "grammar",
                   "custom_dataset": "custom"}
# llama-recipes' config classes: `--NAME.field` sets one field of one of them, and a plain `--field` sets it
# in every config that has it (its update_config), so the rules below are keyed by the plain field name.
CONFIG_NAMES = ("train_config", "fsdp_config", "lora_config", "llama_adapter_config", "prefix_config",
                "quantization_config", "wandb_config", "samsum_dataset", "grammar_dataset", "alpaca_dataset",
                "custom_dataset", "llamaguard_toxicchat_dataset")
DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".arrow", ".txt")


def read_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--name value`, `--name=value`, bare `--name` (None) -> [(name, raw value)], dashes in names as
    underscores. A value that starts with `--` must be written `--name=--value`."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise SpecError(arg, "flags are written --name value or --name=value (a bare --flag is true); "
                                 "see python -m hpcft.train --help")
        name, sep, value = arg[2:].partition("=")
        if not sep:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if following is not None and not following.startswith("--"):
                value, i = following, i + 1
            else:
                value = None
        pairs.append((name.replace("-", "_"), value))
        i += 1
    return pairs


def as_bool(name: str, raw: object) -> bool:
    if raw is None or raw is True:
        return True
    if raw is False:
        return False
    if str(raw).lower() in TRUE_WORDS + FALSE_WORDS:
        return str(raw).lower() in TRUE_WORDS
    raise SpecError(f"train.{name}", f"must be true or false (got {raw!r}); a bare --{name} is true")


@dataclass
class _Pending:
    """llama-recipes names that decide a field together, resolved once every flag is read."""
    enable_fsdp: bool | None = None
    mixed_precision: bool | None = None
    use_fp16: bool | None = None
    pure_bf16: bool | None = None
    root: str | None = None  # dist_checkpoint_root_folder
    folder: str | None = None  # dist_checkpoint_folder
    output_dir: str | None = None
    given: list[str] | None = None  # the llama-recipes names seen, in order, for the notes

    def saw(self, name: str) -> None:
        self.given = [*(self.given or []), name]


def _set(field: str, convert: Callable[[str, object], object] | None = None):
    """A llama-recipes name that is one hpcft field under another name."""
    def rule(name: str, raw, out: dict, pend: _Pending, notes: list[str]) -> None:
        out[field] = convert(name, raw) if convert else raw
        notes.append(f"--{name} -> {field}={_show(out[field])}")
    return rule


def _accepted(what: str):
    """A llama-recipes name whose effect hpcft always has."""
    def rule(name: str, raw, out: dict, pend: _Pending, notes: list[str]) -> None:
        notes.append(f"--{name}: {what}")
    return rule


def _refused(why: str, *, unless: object = "__never__"):
    """A llama-recipes name hpcft cannot honour: refused naming the nearest field (a value equal to
    `unless`, the setting that changes nothing, is accepted)."""
    def rule(name: str, raw, out: dict, pend: _Pending, notes: list[str]) -> None:
        if unless != "__never__" and _same(raw, unless):
            notes.append(f"--{name}={_show(raw)}: nothing to change")
            return
        raise SpecError(f"train.{name}", why)
    return rule


def _same(raw, value) -> bool:
    if isinstance(value, bool):
        try:
            return as_bool("", raw) == value
        except SpecError:
            return False
    return str(raw) == str(value)


def _pending(attr: str, convert=as_bool):
    def rule(name: str, raw, out: dict, pend: _Pending, notes: list[str]) -> None:
        setattr(pend, attr, convert(name, raw) if convert else _need(name, raw))
        pend.saw(name)
    return rule


def _need(name: str, raw) -> str:
    if raw is None:
        raise SpecError(f"train.{name}", f"needs a value: --{name} VALUE")
    return str(raw)


def _enable_fsdp(name, raw, out, pend, notes) -> None:
    pend.enable_fsdp = as_bool(name, raw)
    pend.saw(name)


def _dataset(name, raw, out, pend, notes) -> None:
    value = _need(name, raw)
    if value == "llamaguard_toxicchat_dataset":
        raise SpecError("train.dataset", "llamaguard_toxicchat_dataset is not shipped with hpcft; the nearest is "
                                         "dataset chat (conversations in a file) or dataset custom")
    out["dataset"] = RECIPE_DATASETS.get(value, value)
    if value in RECIPE_DATASETS:
        source = "rows from custom_dataset's function" if value == "custom_dataset" else \
            "its form; the data is read from data_path, never the hub"
        notes.append(f"--{name} {value} -> dataset={out['dataset']} ({source})")


def _quantization(name, raw, out, pend, notes) -> None:
    if raw is None or str(raw).lower() in TRUE_WORDS:  # llama-recipes before 4bit/8bit: a bool meaning 8-bit
        out["quantization"] = "8bit"
    elif str(raw).lower() in FALSE_WORDS or str(raw).lower() == "none":
        out["quantization"] = None
    else:
        out["quantization"] = str(raw)
    notes.append(f"--{name} -> quantization={_show(out['quantization'])}")


def _use_wandb(name, raw, out, pend, notes) -> None:
    trackers = [t for t in _tuple(out.get("report_to", ())) if t != "wandb"]
    out["report_to"] = (*trackers, "wandb") if as_bool(name, raw) else tuple(trackers)
    notes.append(f"--{name} -> report_to={_show(out['report_to'])} (offline runs under the run directory unless "
                 "WANDB_MODE says otherwise)")


def _hsdp(name, raw, out, pend, notes) -> None:
    if as_bool(name, raw):
        out["sharding_strategy"] = "HYBRID_SHARD"
        notes.append(f"--{name} -> sharding_strategy=HYBRID_SHARD (shards within a node, replicates across nodes)")


def _split(field: str, default_note: str):
    """train_split/test_split: grammar_dataset's are CSV files (then they are the data), the others name a
    split of the hub dataset (hpcft reads files only)."""
    def rule(name, raw, out, pend, notes) -> None:
        value = _need(name, raw)
        if value.endswith(DATA_SUFFIXES):
            out[field] = value
            notes.append(f"--{name} {value} -> {field}={value}")
        else:
            notes.append(f"--{name} {value}: {default_note}")
    return rule


def _sharding(name, raw, out, pend, notes) -> None:
    out["sharding_strategy"] = _need(name, raw).removeprefix("ShardingStrategy.")
    notes.append(f"--{name} -> sharding_strategy={out['sharding_strategy']}")


def _checkpoint_type(name, raw, out, pend, notes) -> None:
    value = _need(name, raw).removeprefix("StateDictType.")
    if value not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise SpecError(f"train.{name}", f"must be SHARDED_STATE_DICT or FULL_STATE_DICT (got {raw!r})")
    notes.append(f"--{name} {value}: {NEAREST_CKPT}; save_model exports one consolidated Hugging Face model")


def _custom_file(name, raw, out, pend, notes) -> None:
    out["custom_dataset"] = _need(name, raw)
    out["dataset"] = "custom"
    notes.append(f"--{name} -> dataset=custom, custom_dataset={out['custom_dataset']}")


def _tuple(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split(",") if v)
    return tuple(value)


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


NEAREST_CKPT = "hpcft checkpoints always hold the sharded model and optimizer state (resume: auto/latest)"

# llama-recipes name -> what it does here. Names equal to a TrainConfig field (model_name, low_cpu_fsdp,
# batch_size_training, context_length, use_peft, peft_method, save_model, ...) are not listed: they are ours.
RULES: dict[str, Callable] = {
    # train_config
    "enable_fsdp": _enable_fsdp,
    "use_fp16": _pending("use_fp16"),
    "mixed_precision": _pending("mixed_precision"),
    "dist_checkpoint_root_folder": _pending("root", None),
    "dist_checkpoint_folder": _pending("folder", None),
    "output_dir": _pending("output_dir", None),
    "use_fast_kernels": _set("attn_implementation", lambda n, r: "sdpa" if as_bool(n, r) else "eager"),
    "dataset": _dataset,
    "quantization": _quantization,
    "use_wandb": _use_wandb,
    "save_metrics": _accepted("metrics.jsonl is always written (every log_every steps), and summary.json at the end"),
    "flop_counter": _accepted("FLOPs per step and MFU are in every metrics.jsonl line"),
    "flop_counter_start": _accepted("MFU is counted from the first step after warm-up"),
    "save_optimizer": _accepted(NEAREST_CKPT),
    "gamma": _refused("llama-recipes' per-epoch StepLR is not in hpcft; the nearest is --lr_scheduler "
                      "linear|cosine with --min_lr_ratio (the decay floor) and --warmup_steps"),
    "one_gpu": _refused("hpcft runs one rank per GPU the launcher starts; for one GPU start one rank "
                        "(torchrun --nproc_per_node 1, or hpcft submit --nodes 1 --gpus-per-node 1)", unless=False),
    "freeze_layers": _refused("not implemented in hpcft; the nearest is --use_peft (only LoRA adapters train)",
                              unless=False),
    "num_freeze_layers": _accepted("read only with freeze_layers, which hpcft does not implement"),
    "freeze_LLM_only": _refused("not implemented in hpcft (vision models); the nearest is --use_peft", unless=False),
    "from_peft_checkpoint": _refused("not implemented in hpcft; to continue a run use --resume (a checkpoint "
                                     "directory, latest or auto)", unless=""),
    # fsdp_config
    "pure_bf16": _pending("pure_bf16"),
    "sharding_strategy": _sharding,
    "hsdp": _hsdp,
    "sharding_group_size": _refused("hpcft's HYBRID_SHARD shards within each node and replicates across nodes; "
                                    "set --sharding_strategy HYBRID_SHARD", unless=0),
    "replica_group_size": _refused("hpcft's HYBRID_SHARD shards within each node and replicates across nodes; "
                                   "set --sharding_strategy HYBRID_SHARD", unless=0),
    "checkpoint_type": _checkpoint_type,
    "fsdp_activation_checkpointing": _set("activation_checkpointing", as_bool),
    "fsdp_cpu_offload": _refused("FSDP CPU offload is not implemented in hpcft; the nearest is --strategy zero3 "
                                 "--offload_params true (DeepSpeed ZeRO-3 parameter offload)", unless=False),
    "optimizer": _refused("hpcft trains with AdamW (fused or foreach); for bf16 optimizer state use "
                          "--pure_bf16 (precision pure_bf16)", unless="AdamW"),
    # lora_config (lora_alpha and lora_dropout are hpcft's names too)
    "r": _set("lora_r"),
    "target_modules": _set("lora_target_modules", lambda n, r: _tuple(_need(n, r).strip("[]()").replace("'", "")
                                                                        .replace('"', "").replace(" ", ""))),
    "bias": _refused("hpcft's LoRA trains no biases; leave bias at none", unless="none"),
    "task_type": _accepted("hpcft sets the task from the model (causal LM or seq2seq)"),
    "inference_mode": _refused("adapters train in hpcft; leave inference_mode false", unless=False),
    "adapter_len": _refused("llama_adapter is not in hpcft; the nearest is --peft_method lora"),
    "adapter_layers": _refused("llama_adapter is not in hpcft; the nearest is --peft_method lora"),
    "num_virtual_tokens": _refused("prefix tuning is not in hpcft; the nearest is --peft_method lora"),
    # datasets (data_path is hpcft's name too)
    "file": _custom_file,
    "train_split": _split("data_path", "hpcft trains on data_path (its train split, if it has splits)"),
    "test_split": _split("eval_data_path", "hpcft evaluates on eval_data_path, else data_path's validation split, "
                                           "else val_fraction of it"),
    "trust_remote_code": _refused("hpcft reads data files only, no dataset scripts", unless=False),
    "input_length": _accepted("the nearest is context_length (tokens per example)"),
    # quantization_config
    "quant_type": _refused("hpcft's 4bit is nf4 with bf16 compute", unless="nf4"),
    "compute_dtype": _accepted("hpcft's 4bit computes in bf16"),
    "quant_storage": _accepted("hpcft's 4bit keeps bitsandbytes' storage"),
    "use_double_quant": _refused("not in hpcft's 4bit", unless=False),
    # wandb_config
    **{k: _refused("set it for wandb in the job's environment (the spec's env: WANDB_"
                   f"{'TAGS' if k == 'tags' else k.upper()}), hpcft passes the run name and spec itself")
       for k in ("project", "entity", "job_type", "tags", "group", "notes", "mode")},
}


def translate(pairs: list[tuple[str, str | None]], fields: dict[str, bool], base: dict) -> tuple[dict, list[str]]:
    """[(name, raw)] -> ({hpcft field: raw or converted value}, notes). `fields`: TrainConfig's field names,
    True for the bools. `base`: the values the flags apply on top of (the defaults, or a spec's train
    section), for the names that are resolved against others (checkpoint folders, precision)."""
    out: dict = {}
    notes: list[str] = []
    pend = _Pending()
    for said, raw in pairs:
        name = said
        if name not in fields and name not in RULES and name.startswith("no") and \
                (fields.get(name[2:]) or name[2:] in RULES) and raw is None:
            said, name, raw = name[2:], name[2:], "false"  # fire's --noflag
        if "." in name:
            config, _, name = name.partition(".")
            if config not in CONFIG_NAMES or "." in name:
                raise SpecError(f"train.{said}", f"unknown flag: {config} is not one of llama-recipes' configs "
                                                 f"({', '.join(CONFIG_NAMES)})")
            if name not in RULES and name not in fields:
                raise SpecError(f"train.{said}", f"unknown flag: {config} has no field {name} that hpcft reads "
                                                 f"({_hint(name, fields)})")
        if name in RULES:
            RULES[name](said, raw, out, pend, notes)
        elif name in fields:
            if raw is None and not fields[name]:
                raise SpecError(f"train.{name}", f"needs a value: --{name} VALUE or --{name}=VALUE")
            out[name] = True if raw is None else raw
        else:
            raise SpecError(f"train.{name}", f"unknown flag ({_hint(name, fields)})")
    _resolve_strategy(pend, out, notes)
    _resolve_precision(pend, out, notes)
    _resolve_export(pend, out, {**base, **out}, notes)
    return out, notes


def _hint(name: str, fields: dict[str, bool]) -> str:
    import difflib

    known = sorted({*fields, *RULES})
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean --{close[0]}?" if close else "see python -m hpcft.train --help for hpcft's names"


def _resolve_strategy(pend: _Pending, out: dict, notes: list[str]) -> None:
    if pend.enable_fsdp is None:
        return
    if not pend.enable_fsdp:
        notes.append("--enable_fsdp=false: the strategy is " + str(out.get("strategy", "the spec's or ddp")))
        return
    if out.get("strategy", "fsdp") != "fsdp":
        raise SpecError("train.enable_fsdp", f"conflicts with --strategy {out['strategy']}; give one of them")
    out["strategy"] = "fsdp"
    notes.append("--enable_fsdp -> strategy=fsdp")


def _resolve_precision(pend: _Pending, out: dict, notes: list[str]) -> None:
    """pure_bf16 > use_fp16 > mixed_precision, as llama-recipes' FSDP policies read them."""
    if pend.pure_bf16 is None and pend.use_fp16 is None and pend.mixed_precision is None:
        return
    if pend.pure_bf16:
        value, said = "pure_bf16", "--pure_bf16"
    elif pend.use_fp16:
        value, said = "fp16", "--use_fp16"
    elif pend.mixed_precision:
        value, said = "bf16", "--mixed_precision"
    elif pend.mixed_precision is False:
        value, said = "fp32", "--mixed_precision=false"
    else:
        return
    if "precision" in out and out["precision"] != value:
        raise SpecError("train.precision", f"--precision {out['precision']} conflicts with {said}; give one of them")
    out["precision"] = value
    notes.append(f"{said} -> precision={value}" + (" (bf16 autocast, fp32 weights)" if value == "bf16" else ""))


def _resolve_export(pend: _Pending, out: dict, cfg: dict, notes: list[str]) -> None:
    """Where save_model puts the model, as llama-recipes' flags say: the PEFT adapter in output_dir; a
    full FSDP model in <dist_checkpoint_root_folder>/<dist_checkpoint_folder>-<model_name>; any other
    full model in output_dir."""
    if pend.root is None and pend.folder is None and pend.output_dir is None:
        return
    peft = _is_true(cfg.get("use_peft", False))
    fsdp = cfg.get("strategy", "ddp") == "fsdp"
    if not peft and fsdp and pend.root is not None:
        target = recipes_model_dir(pend.root, pend.folder or "fine-tuned", str(cfg.get("model_name", "")))
        said = "--dist_checkpoint_root_folder/--dist_checkpoint_folder"
    elif pend.output_dir is not None and (peft or not fsdp):
        target, said = pend.output_dir, "--output_dir"
        if pend.root is not None or pend.folder is not None:
            notes.append("--dist_checkpoint_root_folder/--dist_checkpoint_folder: unused with "
                         f"{'use_peft' if peft else 'strategy ' + str(cfg.get('strategy'))} (llama-recipes saves "
                         "this model to --output_dir)")
    else:
        unused = [n for n in ("dist_checkpoint_root_folder", "dist_checkpoint_folder", "output_dir")
                  if n in (pend.given or [])]
        notes.append(f"--{', --'.join(unused)}: not where this run's model goes "
                     f"({'the PEFT adapter goes to --output_dir' if peft else 'a full FSDP model goes to --dist_checkpoint_root_folder'}); "
                     "the model goes to the run directory's model/")
        return
    if "export_dir" in out and out["export_dir"] != target:
        raise SpecError("train.export_dir", f"--export_dir {out['export_dir']} conflicts with {said} ({target}); "
                                            "give one of them")
    out["export_dir"] = target
    notes.append(f"{said} -> export_dir={target}" + ("" if _is_true(cfg.get("save_model", True)) else
                                                    " (written only with save_model)"))


def _is_true(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in TRUE_WORDS
