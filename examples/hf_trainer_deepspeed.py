"""A user's own HF Trainer script with a DeepSpeed config, run through hpcft's launcher unchanged:

    hpcft submit --nodes 2 --gpus-per-node 2 jobs/samsum_tiny.yaml -- examples/hf_trainer_deepspeed.py \
        --model artifacts/tiny-llama --deepspeed examples/ds_zero2.json --out runs/trainer-ds

It knows nothing of hpcft or Slurm: torchrun's RANK/WORLD_SIZE/LOCAL_RANK (set by hpcft's launcher) are
all Trainer needs. On nodes without CUDA the launcher sets ACCELERATE_USE_CPU, so Trainer and DeepSpeed
form one CPU world (gloo) instead of N single-process runs. Prints the world it trained in and the loss.
"""
import argparse
import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--deepspeed", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = [f"{a} plus {b} is {a + b}." for a in range(20) for b in range(10)]
    ds = Dataset.from_dict({"text": texts}).map(lambda ex: tok(ex["text"], truncation=True, max_length=32),
                                                batched=True, remove_columns=["text"])
    model = AutoModelForCausalLM.from_pretrained(args.model)
    targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4,
                              learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                              deepspeed=args.deepspeed, ddp_backend=None if torch.cuda.is_available() else "gloo",
                              disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    result = trainer.train()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    assert world == int(os.environ.get("WORLD_SIZE", "1")), (world, os.environ.get("WORLD_SIZE"))
    report = {"world_size": world, "deepspeed": trainer.is_deepspeed_enabled, "loss": result.training_loss,
              "device": str(trainer.args.device)}
    if trainer.is_world_process_zero():
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "report.json").write_text(json.dumps(report) + "\n")
    print(f"hf_trainer_deepspeed: {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main()
