"""Parts 1, 2 and 7: hpcft vs HF Trainer (non-pad tokens/s), CPU-MFU, and every strategy's tokens/s."""
from __future__ import annotations

import json
import subprocess

from bench.common import PY, ROOT, Setup, env_for, hf_run, hpcft_run, median
from hpcft.train.flops import flops_per_token


def vs_hf(setup: Setup) -> dict:
    """Alternating repeats: hpcft (packing, examples isolated), HF Trainer (padding), hpcft (padding),
    hpcft (packing as one stream, llama-recipes' concat), ... ."""
    runs: dict[str, list[float]] = {"hpcft_packing": [], "hf_trainer": [], "hpcft_padding": [], "hpcft_concat": []}
    summary = {}
    for rep in range(setup.reps):
        s = hpcft_run(setup, f"vs_hf/hpcft_packing_{rep}", packing_mode="isolated")
        runs["hpcft_packing"].append(s["tokens_per_s_steady"])
        summary = s
        runs["hf_trainer"].append(hf_run(setup, f"vs_hf/hf_trainer_{rep}")["tokens_per_s_steady"])
        runs["hpcft_padding"].append(
            hpcft_run(setup, f"vs_hf/hpcft_padding_{rep}", batching_strategy="padding")["tokens_per_s_steady"])
        runs["hpcft_concat"].append(
            hpcft_run(setup, f"vs_hf/hpcft_concat_{rep}", packing_mode="concat")["tokens_per_s_steady"])
    med = {k: median(v) for k, v in runs.items()}
    return {"runs": runs, "median": med, "ratio": med["hpcft_packing"] / med["hf_trainer"],
            "ratio_same_batching": med["hpcft_padding"] / med["hf_trainer"], "target": 1.5,
            "parameters": summary.get("parameters"), "config": describe(setup)}


def describe(setup: Setup) -> dict:
    return {"model": "Llama hidden 512, 8 layers, 8 heads, vocab 4096", "context_length": setup.context,
            "batch_per_rank": setup.batch, "world_size": 2, "threads_per_rank": 1, "optimizer": "AdamW (fused) lr 1e-4, cosine, clip 1.0",
            "steps": setup.steps, "warmup_steps_excluded": setup.warmup, "repeats": setup.reps}


def measure_peaks() -> dict:
    out = subprocess.run([PY, str(ROOT / "bench" / "peak.py"), "2"], check=True, capture_output=True, text=True,
                         env=env_for(1), cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mfu(setup: Setup, tokens_per_s: dict[str, float], peaks: dict, n_params: int) -> dict:
    """Training FLOP/s per rank (6N + attention, PaLM appendix B, packed rows of context_length) over
    the matmul peak each of two concurrent single-thread processes measured."""
    per_token = flops_per_token(n_params, 8, 512, setup.context)
    out = {}
    for precision, tps in tokens_per_s.items():
        peak = peaks["float32_x2" if precision == "fp32" else "bfloat16_x2"]
        flops = tps / 2 * per_token
        out[precision] = {"tokens_per_s": tps, "flops_per_s_per_rank": flops, "peak_per_rank": peak,
                          "mfu": flops / peak}
    return {"by_precision": out, "peaks": peaks, "target": 0.5, "parameters": n_params}


STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


def strategy_table(setup: Setup) -> dict:
    rows = []
    steps = setup.warmup + (3 if setup.quick else 6)
    for precision in ("fp32", "bf16"):
        for peft in (False, True):
            for strategy in STRATEGIES:
                name = f"strategies/{strategy}_{precision}{'_lora' if peft else ''}"
                row = {"strategy": strategy, "precision": precision, "lora": peft}
                try:
                    s = hpcft_run(setup, name, strategy=strategy, precision=precision, use_peft=peft,
                                  max_train_step=steps)
                except RuntimeError as exc:  # recorded, the table goes on
                    row.update(tokens_per_s=None, error=str(exc)[-1500:])
                else:
                    row.update(tokens_per_s=s["tokens_per_s_steady"], trainable=s["trainable_parameters"],
                               final_loss=s["final_train_loss"])
                rows.append(row)
    return {"rows": rows, "steps": steps}


def profile(setup: Setup, n_params: int) -> dict:
    """Op breakdown of a single-rank step (fp32, bf16) and one gradient all-reduce at 2 ranks."""
    from bench.common import TORCHRUN, run_logged

    out = {}
    for precision in ("fp32", "bf16"):
        path = setup.out / "profile" / f"step_{precision}.json"
        run_logged([PY, str(ROOT / "bench" / "profile_step.py"), str(setup.model), str(setup.data), precision,
                    str(path)], path.with_suffix(".log"), env_for(1))
        out[precision] = json.loads(path.read_text())
    path = setup.out / "profile" / "allreduce.json"
    run_logged([TORCHRUN, "--standalone", "--nproc-per-node=2", str(ROOT / "bench" / "profile_step.py"), "--allreduce",
                str(n_params), str(path)], path.with_suffix(".log"), env_for(1))
    out["allreduce"] = json.loads(path.read_text())
    return out
