"""The baseline: Hugging Face Trainer under torchrun, as the seed guides' users run it, on the same
model, data, tokenization, optimizer and number of optimizer steps as the hpcft run it is compared with.

    torchrun --standalone --nproc-per-node 2 bench/hf_trainer.py MODEL DATA OUT STEPS BATCH CONTEXT PRECISION

Batches are padded to their longest example (DataCollatorForSeq2Seq, the usual SFT collator). The
examples are hpcft's own tokenization (the data cache beside DATA), so both sides train on the same
tokens. Writes OUT/steps.jsonl: wall time and non-pad tokens (all ranks) at the end of every optimizer step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)

from hpcft.prepare import prepare
from hpcft.train.config import TrainConfig


class StepClock(TrainerCallback):
    """Non-pad tokens are counted by the collator (this rank) and summed over ranks at the end."""

    def __init__(self, counter: list[int]):
        self.counter = counter
        self.rows: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.rows.append({"step": state.global_step, "time": time.time(), "tokens": self.counter[0]})


def main() -> None:
    model_dir, data, out, steps, batch, context, precision = sys.argv[1:8]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    done = prepare(TrainConfig(model_name=model_dir, data_path=data, dataset="samsum", context_length=int(context)),
                   Path(data).parent / "data-cache", log=lambda _: None)
    from datasets import load_from_disk

    ds = load_from_disk(str(done.train.path))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    counter = [0]
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collate(features):
        batch = collate(features)
        counter[0] += int(batch["attention_mask"].sum())
        return batch

    args = TrainingArguments(
        output_dir=out, max_steps=int(steps), per_device_train_batch_size=int(batch), learning_rate=1e-4,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        logging_steps=int(steps), save_strategy="no", report_to=[], seed=42, use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16", ddp_backend="gloo" if not torch.cuda.is_available() else None,
        dataloader_num_workers=0, disable_tqdm=True)
    clock = StepClock(counter)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting_collate, callbacks=[clock])
    trainer.train()
    rows_out = clock.rows
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows_out)
        rows_out = [dict(r, tokens=sum(g[i]["tokens"] for g in gathered)) for i, r in enumerate(rows_out)]
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_out))
    del trainer, model
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
