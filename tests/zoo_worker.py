"""Under torchrun (2 ranks): hpcft.train's run() for each case of a JSON list, one after another in one
process group (tests/test_model_zoo.py); rank 0 appends one JSON line per case (the run's summary) to the
output file. Then, in one plain process (--read-back), each export read back as users read it: its eval loss by
hpcft.train.evaluate, and whether a tie survived the save.

    torchrun --standalone --nproc-per-node 2 tests/zoo_worker.py cases.json results.jsonl
    python tests/zoo_worker.py --read-back cases.json results.jsonl     # adds reloaded_eval_loss, tied_after_reload
"""
import dataclasses
import gc
import json
import os
import sys
import traceback
from pathlib import Path

import hpcft.train.run as train_run
from hpcft.train.config import TrainConfig
from hpcft.train.evaluate import evaluate_saved

train_run.cleanup = gc.collect  # the process group stays for the next case (a second init under torchrun fails)


def export_facts(model_dir: str, cfg: TrainConfig) -> dict:
    """The export's eval loss, read back as users read it, and whether a tie survived the save."""
    facts = {"reloaded_eval_loss": evaluate_saved(dataclasses.replace(cfg, model_name=model_dir, precision="fp32"))}
    if not cfg.use_peft:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = cls.from_pretrained(model_dir, local_files_only=True)
        facts["tied_after_reload"] = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return facts


def read_back(cases: list[dict], out: Path) -> None:
    train = {c["name"]: c["train"] for c in cases}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        row.update(export_facts(row["summary"]["model_dir"], TrainConfig(**train[row["name"]])))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    for case in cases:
        os.environ["HPCFT_RUN_DIR"] = case["run_dir"]
        cfg = TrainConfig(**case["train"])
        try:
            row = {"name": case["name"], "summary": train_run.run(cfg)}
        except BaseException:
            traceback.print_exc()
            print(f"ZOO-CASE-FAILED {case['name']} on rank {rank}", flush=True)
            sys.stdout.flush()
            os._exit(1)
        if rank == 0:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"ZOO-CASE-DONE {case['name']}", flush=True)


if __name__ == "__main__" and sys.argv[1] == "--read-back":
    read_back(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
elif __name__ == "__main__":
    main()
    from hpcft.train.__main__ import exit_now

    gc.collect()
    train_run.dist.destroy_process_group()
    exit_now(0)
