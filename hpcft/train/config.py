"""TrainConfig: every knob of the shared training entrypoint, named as the seed guides name them
(llama-recipes' training.py: model_name, batch_size_training, context_length, lr, num_epochs, ...).

The same dataclass is the `train:` section of a job spec and the flags of `python -m hpcft.train`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from hpcft.dataformat import DATASETS
from hpcft.errors import SpecError
from hpcft.typedload import build_dataclass

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16")
BATCHING = ("padding", "packing")
PACKING_MODES = ("isolated", "concat")
MODEL_TYPES = ("auto", "causal", "seq2seq")
SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class TrainConfig:
    model_name: str = "artifacts/tiny-llama"  # local directory with config + weights (from_pretrained)
    tokenizer_name: str | None = None  # defaults to model_name
    dataset: str = "auto"  # the data's form: samsum, alpaca, grammar, completion, chat, text, tokens, custom; auto
    #   tells it from the columns (hpcft.dataformat)
    data_path: str = "data/samsum_tiny.jsonl"  # .jsonl/.json/.csv/.parquet/.arrow/.txt file, a glob of them, a
    #   save_to_disk directory or a directory load_dataset reads (hpcft.datasource)
    eval_data_path: str | None = None  # the same for evaluation; default: data_path's validation split, else
    #   val_fraction of it held out
    val_fraction: float = 0.1  # share of data_path held out for eval when there is no eval split
    custom_dataset: str | None = None  # dataset: custom: path/to/file.py[:function], called as llama-recipes'
    #   get_custom_dataset(dataset_config, tokenizer, split) and returning rows of any form (or token ids)
    dataset_text_field: str = "text"  # the column dataset: text trains on (TRL's name)
    chat_template: str | None = None  # dataset: chat: a Jinja chat template, or a file holding one; default: the
    #   tokenizer's own
    data_cache_dir: str | None = None  # tokenized data shared by jobs; default <output_dir>/data-cache
    dataset_num_proc: int = 0  # processes that tokenize (once per job); 0: every CPU the tokenizing process has
    #   (data under 64 MiB is tokenized by rank 0 itself in one process unless this asks for more)
    data_timeout_s: int = 7200  # how long ranks wait for the job's one tokenizing process (no collective timeout)
    context_length: int = 256  # tokens per example; longer examples are truncated (text: cut into pieces)
    model_type: str = "auto"  # causal (decoder-only) or seq2seq (BART-style); auto reads the model config
    strategy: str = "ddp"  # parallelism: ddp, fsdp, zero1, zero2, zero3 (DeepSpeed)
    sharding_strategy: str = "FULL_SHARD"  # fsdp: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD
    low_cpu_fsdp: bool | None = None  # fsdp: each rank reads only its shard of the weights (built on the meta
    #   device); rank 0 reads and broadcasts where the safetensors files do not name every parameter. Default:
    #   on when distributed; false: every rank reads the whole model first
    zero3_init_flag: bool = True  # zero3: build the model under deepspeed.zero.Init (partitioned as it loads);
    #   false: every rank reads the whole model first
    deepspeed_config: str | None = None  # zero*: a DeepSpeed JSON; default hpcft/configs/ds_zero<N>.json
    offload_optimizer: bool = False  # zero*: keep optimizer state in CPU memory (DeepSpeedCPUAdam)
    offload_params: bool = False  # zero3: keep parameters in CPU memory
    use_peft: bool = False  # LoRA adapters through peft; only adapter weights train
    peft_method: str = "lora"  # lora
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator
    lora_dropout: float = 0.05  # dropout on the LoRA path
    # module names that get adapters; empty: the family's attention projections (peft's table by model_type:
    # q_proj/v_proj, c_attn, qkv_proj, query_key_value, q/v); all-linear: every linear layer but the output one
    lora_target_modules: tuple[str, ...] = ()
    quantization: str | None = None  # 4bit (QLoRA) or 8bit: needs CUDA and bitsandbytes
    precision: str = "fp32"  # fp32, bf16 (autocast), fp16 (autocast + loss scaling), pure_bf16 (weights in bf16)
    tf32: bool | None = None  # CUDA: TF32 tensor-core matmuls for fp32 work; default on for precision fp32 (false: exact)
    activation_checkpointing: bool = False  # recompute activations in backward to save memory
    compile: bool = False  # torch.compile each transformer block (regional); ddp and fsdp, with LoRA and checkpointing
    # sdpa (eager for a family without an sdpa path: Gemma 2), eager or flash_attention_2 (llama-recipes' use_fast_kernels)
    attn_implementation: str = "sdpa"
    batching_strategy: str = "padding"  # padding (one example per row) or packing (several examples per row)
    packing_mode: str = "isolated"  # packing: isolated (whole examples per row, positions restart and attention
    #   stays inside each example) or concat (llama-recipes: one token stream cut into rows, examples see each other)
    batch_size_training: int = 4  # micro-batch per rank
    val_batch_size: int = 8  # eval batch per rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    gradient_clipping: bool = True  # clip the global grad norm
    gradient_clipping_threshold: float = 1.0  # max grad norm
    num_epochs: int = 1  # passes over the training data
    max_train_step: int = 0  # stop after this many optimizer steps (0: no limit)
    max_eval_step: int = 0  # eval batches per rank (0: the whole eval set)
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warmup steps
    lr_scheduler: str = "cosine"  # after warmup: cosine, linear or constant
    min_lr_ratio: float = 0.1  # decay floor as a fraction of lr
    seed: int = 42  # model init, data order and dropout
    run_validation: bool = True  # eval loss before and after training
    log_every: int = 1  # optimizer steps between metrics.jsonl lines
    num_workers_dataloader: int = 0  # DataLoader worker processes per rank
    save_model: bool = True  # save the final model (HF format, or the PEFT adapter) in the run directory
    export_dir: str | None = None  # save_model writes there instead of <run>/model (llama-recipes: --output_dir for
    #   the adapter, --dist_checkpoint_root_folder/--dist_checkpoint_folder for a full FSDP model); replaced if it holds
    #   an earlier export, refused if it holds anything else
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end of the run)
    keep_checkpoints: int = 2  # newest complete checkpoints kept per run; 0: none written (smoke tests, benchmarks)
    async_checkpoint: bool = False  # ddp/fsdp: stage checkpoints in host memory and write them while training goes on
    resume: str = "auto"  # auto: this run's newest complete checkpoint (requeue); latest: any run of this job name; never; or a path
    max_steps_this_run: int = 0  # stop (with a checkpoint) after this many steps of this run; the schedule is unchanged
    peak_tflops: float | None = None  # per-rank peak for MFU; default: known GPU by name, or measured on CPU
    use_profiler: bool = False  # torch profiler trace of a few steps into <run>/profiler/
    profiler_dir: str | None = None  # use_profiler: the traces go there instead of <run>/profiler/
    tensorboard: bool = False  # TensorBoard scalars into <run>/tensorboard/ (the same as report_to: [tensorboard])
    report_to: tuple[str, ...] = ()  # experiment trackers on rank 0: tensorboard, wandb (offline), mlflow (file store
    #   in the run directory unless MLFLOW_TRACKING_URI is set); the metrics.jsonl scalars and the spec as params
    plot: bool = True  # PNG of loss and throughput at the end of the run
    timeout_s: int = 600  # collective timeout; a dead peer fails the job after this long
    hang_timeout_s: int = 300  # watchdog: no rank-local progress (a step phase) for this long ends every rank with
    #   its stack in its log, and `hpcft logs` names the rank that stopped first; guards training steps after the
    #   first (not load, eval, saves, export); must exceed the longest step; < timeout_s; 0 turns it off
    preflight: bool = True  # before training: world size, all-reduce, GPUs per rank, versions, shared run dir

    def validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise SpecError(f"train.{name}", msg)

        if not self.model_name:
            bad("model_name", "set it to a local model directory, e.g. artifacts/tiny-llama")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        if self.dataset not in DATASETS:
            bad("dataset", f"must be one of {', '.join(DATASETS)} (got {self.dataset!r})")
        for name, allowed in (("sharding_strategy", SHARDING), ("precision", PRECISIONS),
                              ("batching_strategy", BATCHING), ("packing_mode", PACKING_MODES),
                              ("model_type", MODEL_TYPES),
                              ("attn_implementation", ("sdpa", "eager", "flash_attention_2")),
                              ("peft_method", ("lora",))):
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.dataset == "custom" and not self.custom_dataset:
            bad("custom_dataset", "dataset: custom needs custom_dataset: path/to/file.py[:function]")
        if self.custom_dataset and self.dataset != "custom":
            bad("custom_dataset", f"is only read with dataset: custom (got dataset {self.dataset})")
        if not self.dataset_text_field:
            bad("dataset_text_field", "name the column that holds the text")
        unknown = [t for t in self.report_to if t not in TRACKERS]
        if unknown:
            bad("report_to", f"unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
        if self.attn_implementation.startswith("flash_attention") and self.precision == "fp32":
            bad("attn_implementation", f"{self.attn_implementation} computes in bf16/fp16 only; use precision bf16 "
                                       "(autocast) or pure_bf16, or attn_implementation sdpa for fp32")
        if self.quantization not in (None, "4bit", "8bit"):
            bad("quantization", f"must be 4bit or 8bit (got {self.quantization!r})")
        if self.quantization and not self.use_peft:
            bad("quantization", "quantized weights cannot be trained directly; set use_peft: true (QLoRA)")
        if self.quantization and self.strategy != "ddp":
            bad("quantization", f"quantized (QLoRA/int8) training runs with strategy ddp only (got {self.strategy})")
        if self.low_cpu_fsdp and self.strategy != "fsdp":
            bad("low_cpu_fsdp", f"applies to strategy fsdp only (got {self.strategy})")
        if self.offload_params and self.strategy != "zero3":
            bad("offload_params", f"parameter offload needs strategy zero3 (got {self.strategy})")
        if self.offload_optimizer and not self.strategy.startswith("zero"):
            bad("offload_optimizer", f"optimizer offload needs a zero strategy (got {self.strategy})")
        if self.compile and self.strategy.startswith("zero"):
            bad("compile", f"works with ddp and fsdp; {self.strategy} (DeepSpeed) partitions and hooks the parameters "
                           "under the compiled graphs: use strategy fsdp (FULL_SHARD is ZeRO-3's layout) or compile: false")
        if self.compile and self.quantization:
            bad("compile", f"does not compile {self.quantization} bitsandbytes layers; drop quantization or compile")
        if self.async_checkpoint and self.strategy.startswith("zero"):
            bad("async_checkpoint", f"covers ddp and fsdp (DCP's async save); {self.strategy} writes DeepSpeed's own "
                                    "checkpoints synchronously: set it false or use fsdp")
        if self.deepspeed_config and not self.strategy.startswith("zero"):
            bad("deepspeed_config", f"is only read by the zero strategies (got {self.strategy})")
        if "all-linear" in self.lora_target_modules and len(self.lora_target_modules) > 1:
            bad("lora_target_modules", "all-linear stands alone: give it, or a list of module names")
        if not self.resume:
            bad("resume", "use auto, latest, never, or a checkpoint directory")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            bad("peak_tflops", f"must be > 0 (got {self.peak_tflops})")
        if self.lr_scheduler not in SCHEDULERS:
            bad("lr_scheduler", f"must be one of {', '.join(SCHEDULERS)} (got {self.lr_scheduler!r})")
        for name in ("context_length", "batch_size_training", "val_batch_size", "gradient_accumulation_steps",
                     "num_epochs", "log_every", "timeout_s", "data_timeout_s"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1 (got {getattr(self, name)})")
        if self.hang_timeout_s < 0 or 0 < self.hang_timeout_s and self.hang_timeout_s >= self.timeout_s:
            bad("hang_timeout_s", f"must be 0 (off) or from 1 to timeout_s - 1 ({self.timeout_s - 1}), so that the "
                                  f"watchdog names the stuck rank before collectives time out (got {self.hang_timeout_s})")
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1 (got {getattr(self, name)})")
        for name in ("save_every", "async_checkpoint", "max_steps_this_run"):
            if self.keep_checkpoints == 0 and getattr(self, name):
                bad(name, f"needs checkpoints, and keep_checkpoints is 0 (none written): set {name} off "
                          "or keep_checkpoints >= 1")
        for name in ("max_train_step", "max_eval_step", "warmup_steps", "num_workers_dataloader", "save_every",
                     "max_steps_this_run", "dataset_num_proc", "keep_checkpoints"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0 (got {getattr(self, name)})")
        if not self.lr > 0:
            bad("lr", f"must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", f"must be in [0, 1) (got {self.val_fraction})")
        if self.run_validation and self.eval_data_path is None and self.val_fraction == 0:
            bad("val_fraction", "is 0 and no eval_data_path is set; set one or run_validation: false")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1] (got {self.min_lr_ratio})")
        if self.gradient_clipping_threshold <= 0:
            bad("gradient_clipping_threshold", f"must be > 0 (got {self.gradient_clipping_threshold})")

    @property
    def trackers(self) -> list[str]:
        """report_to, with tensorboard when the older tensorboard: true asks for it."""
        return list(dict.fromkeys([*self.report_to, *(["tensorboard"] if self.tensorboard else [])]))

    def to_args(self) -> list[str]:
        """Flags for `python -m hpcft.train`, only those that differ from the defaults, in field order;
        parse_args reads them back."""
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                args.append(f"--{f.name}={_format(value)}")
        return args


def _format(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_flags(argv: list[str], base: TrainConfig | None = None) -> tuple[TrainConfig, list[str]]:
    """Flags -> TrainConfig on top of `base` (default: the defaults), and what each llama-recipes name
    became (hpcft.train.recipe_flags). `--name=value`, `--name value`, a bare `--flag` is true; lists are
    comma-separated; `none` is None."""
    from hpcft.train.recipe_flags import read_flags, translate

    hints = typing.get_type_hints(TrainConfig)
    fields = {name: tp is bool or str(tp) == "bool | None" for name, tp in hints.items()}
    start = base or TrainConfig()
    base_values = {f.name: getattr(start, f.name) for f in dataclasses.fields(TrainConfig)}
    given, notes = translate(read_flags(argv), fields, base_values)
    for key, value in given.items():
        if isinstance(value, str) and str(hints[key]).startswith("tuple"):
            value = [v for v in value.split(",") if v]
        given[key] = None if value == "none" else value
    values = {**(base_values if base else {}), **given}
    return build_dataclass(TrainConfig, values, "train"), notes


def parse_args(argv: list[str]) -> TrainConfig:
    """`--name=value` / `--name value` flags (what to_args writes, and llama-recipes' names) -> TrainConfig."""
    return parse_flags(argv)[0]
