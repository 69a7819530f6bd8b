"""TrainConfig: every knob of the shared training entrypoint, named as the seed guides name them
(llama-recipes' training.py: model_name, batch_size_training, context_length, lr, num_epochs, ...).

The same dataclass is the `train:` section of a job spec and the flags of `python -m hpcft.train`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from hpcft.errors import SpecError

STRATEGIES = ("ddp",)
DATASETS = ("auto", "samsum", "alpaca")
SCHEDULERS = ("cosine", "linear", "constant")




@dataclass(frozen=True)
class TrainConfig:
    model_name: str = "artifacts/tiny-llama"  # local directory with config + weights (from_pretrained)
    tokenizer_name: str | None = None  # defaults to model_name
    dataset: str = "auto"  # samsum (dialogue -> summary), alpaca (instruction/input/output), auto
    data_path: str = "data/samsum_tiny.jsonl"  # local JSONL file of training examples
    eval_data_path: str | None = None  # local JSONL for evaluation; default: hold out val_fraction
    val_fraction: float = 0.1  # share of data_path held out for eval when eval_data_path is unset
    context_length: int = 256  # tokens per example; longer examples are truncated
    strategy: str = "ddp"  # parallelism: ddp
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
    save_model: bool = True  # save the final model (HF format) in the run directory
    timeout_s: int = 600  # collective timeout; a dead peer fails the job after this long

    def validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise SpecError(f"train.{name}", msg)

        if not self.model_name:
            bad("model_name", "set it to a local model directory, e.g. artifacts/tiny-llama")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        if self.dataset not in DATASETS:
            bad("dataset", f"must be one of {', '.join(DATASETS)} (got {self.dataset!r})")
        if self.lr_scheduler not in SCHEDULERS:
            bad("lr_scheduler", f"must be one of {', '.join(SCHEDULERS)} (got {self.lr_scheduler!r})")
        for name in ("context_length", "batch_size_training", "val_batch_size", "gradient_accumulation_steps",
                     "num_epochs", "log_every", "timeout_s"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1 (got {getattr(self, name)})")
        for name in ("max_train_step", "max_eval_step", "warmup_steps", "num_workers_dataloader"):
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

    def to_args(self) -> list[str]:
        """Flags for `python -m hpcft.train`, only those that differ from the defaults, in field order."""
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                args.append(f"--{f.name}={_format(value)}")
        return args


def _format(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)
