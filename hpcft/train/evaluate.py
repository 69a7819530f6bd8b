"""Eval loss of a saved model (a full HF export, or a PEFT adapter on its base) on the same eval
split training used, in one process:

    python -m hpcft.train.evaluate --model_name=runs/samsum-tiny/123/model --data_path=data/samsum_tiny.jsonl
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from hpcft.distenv import DistEnv
from hpcft.errors import SpecError
from hpcft.paths import RunPaths, data_cache_dir
from hpcft.prepare import is_seq2seq, load_tokenizer, prepare
from hpcft.train.config import TrainConfig, parse_args
from hpcft.train.data import load_splits, make_eval_loader
from hpcft.train.dist import Runtime
from hpcft.train.loop import evaluate
from hpcft.train.model import load_model


def load_saved(cfg: TrainConfig):
    """(model, tokenizer, seq2seq) from an export directory; adapters go onto their base model."""
    adapter = Path(cfg.model_name) / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_dir = json.loads(adapter.read_text())["base_model_name_or_path"]
        base_cfg = dataclasses.replace(cfg, model_name=base_dir, tokenizer_name=cfg.model_name)
        seq2seq = is_seq2seq(base_cfg)
        model = PeftModel.from_pretrained(load_model(base_cfg, seq2seq=seq2seq, dtype=torch.float32), cfg.model_name)
        return model, load_tokenizer(base_cfg), seq2seq
    seq2seq = is_seq2seq(cfg)
    return load_model(cfg, seq2seq=seq2seq, dtype=torch.float32), load_tokenizer(cfg), seq2seq


def cache_root(cfg: TrainConfig) -> Path:
    """train.data_cache_dir, else the cache of the job whose export this is (<run>/model), else runs/."""
    if cfg.data_cache_dir:
        return Path(cfg.data_cache_dir)
    run_dir = Path(cfg.model_name).parent
    return RunPaths(run_dir).data_cache if RunPaths(run_dir).train_config.is_file() else data_cache_dir("runs")


def evaluate_saved(cfg: TrainConfig) -> float:
    model, tokenizer, seq2seq = load_saved(cfg)
    # The export holds the tokenizer it was trained with; an adapter's base decides the model kind.
    data_cfg = dataclasses.replace(cfg, model_type="seq2seq" if seq2seq else "causal")
    splits = load_splits(data_cfg, prepare(data_cfg, cache_root(cfg), log=lambda _: None), seq2seq=seq2seq)
    if splits.eval is None:
        raise SpecError("train.eval_data_path", "no eval split: set eval_data_path or val_fraction > 0")
    loader = make_eval_loader(splits.eval, batch_size=cfg.val_batch_size, rank=0, world_size=1,
                              pad_id=tokenizer.pad_token_id, attn_implementation=cfg.attn_implementation)
    rt = Runtime(env=DistEnv(), device=torch.device("cpu"), backend="gloo")
    engine = SimpleNamespace(model=model, autocast=contextlib.nullcontext)
    return evaluate(engine, loader, rt, max_steps=cfg.max_eval_step, seq2seq=seq2seq)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        print(json.dumps({"model": cfg.model_name, "eval_loss": evaluate_saved(cfg)}))
    except SpecError as exc:
        print(f"hpcft.train.evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
