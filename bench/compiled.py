"""Part 10: train.compile (regional torch.compile of each transformer block) against HF Trainer on the
same padded batches, and bf16 CPU-MFU with and without compile. Alternating repeats, one run."""
from __future__ import annotations

import json

from bench.common import PY, ROOT, Setup, env_for, hf_run, hpcft_run, median, run_logged
from bench.throughput import mfu


def compiled(setup: Setup, peaks: dict) -> dict:
    """Per repeat: hpcft padding + compile, HF Trainer (padding), hpcft padding without compile (fp32,
    the vs_hf configuration); the first two again in bf16 (autocast on both sides); then packed bf16
    with and without compile (the MFU configuration).
    Compilation happens in the warm-up steps that the throughput window leaves out."""
    runs: dict[str, list[float]] = {k: [] for k in ("hpcft_compile", "hf_trainer", "hpcft_eager", "hpcft_compile_bf16",
                                                    "hf_trainer_bf16", "bf16_compile", "bf16_eager")}
    params = None
    for rep in range(setup.reps):
        runs["hpcft_compile"].append(hpcft_run(setup, f"compile/hpcft_compile_{rep}", batching_strategy="padding",
                                               compile=True)["tokens_per_s_steady"])
        runs["hf_trainer"].append(hf_run(setup, f"compile/hf_trainer_{rep}")["tokens_per_s_steady"])
        runs["hpcft_eager"].append(hpcft_run(setup, f"compile/hpcft_eager_{rep}",
                                             batching_strategy="padding")["tokens_per_s_steady"])
        runs["hpcft_compile_bf16"].append(hpcft_run(setup, f"compile/hpcft_compile_bf16_{rep}", batching_strategy="padding",
                                                    precision="bf16", compile=True)["tokens_per_s_steady"])
        runs["hf_trainer_bf16"].append(hf_run(setup, f"compile/hf_trainer_bf16_{rep}", precision="bf16")["tokens_per_s_steady"])
        s = hpcft_run(setup, f"compile/bf16_compile_{rep}", precision="bf16", compile=True)
        params = s["parameters"]
        runs["bf16_compile"].append(s["tokens_per_s_steady"])
        runs["bf16_eager"].append(hpcft_run(setup, f"compile/bf16_eager_{rep}", precision="bf16")["tokens_per_s_steady"])
    med = {k: median(v) for k, v in runs.items()}
    profile = compile_profile(setup)
    by = mfu(setup, {"bf16_compile": med["bf16_compile"], "bf16_eager": med["bf16_eager"]}, peaks, params)
    return {"runs": runs, "median": med, "ratio": med["hpcft_compile"] / med["hf_trainer"],
            "ratio_eager": med["hpcft_eager"] / med["hf_trainer"], "ratio_bf16": med["hpcft_compile_bf16"] / med["hf_trainer_bf16"], "compile_speedup": med["hpcft_compile"] / med["hpcft_eager"],
            "bf16_compile_speedup": med["bf16_compile"] / med["bf16_eager"], "target": 1.1, "mfu_target": 0.5,
            "mfu": {k: v["mfu"] for k, v in by["by_precision"].items()}, "peaks": peaks, "parameters": params,
            "profile": profile}


def compile_profile(setup: Setup) -> dict:
    """Where a one-rank step's time goes, eager and compiled, on the padded batches of the comparison
    (fp32 and bf16): compile can only shrink what is not a matrix multiply or attention kernel."""
    out = {}
    for precision in ("fp32", "bf16"):
        for compiled_ in (False, True):
            name = f"{precision}_{'compile' if compiled_ else 'eager'}"
            path = setup.out / "profile" / f"padded_{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            run_logged([PY, str(ROOT / "bench" / "profile_step.py"), str(setup.model), str(setup.data), precision,
                        str(path), "--padding", *(["--compile"] if compiled_ else [])], path.with_suffix(".log"), env_for(1))
            out[name] = json.loads(path.read_text())
    return out
