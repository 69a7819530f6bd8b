"""Part 5: per-rank bytes of parameters + gradients + optimizer state, for each strategy at 2 ranks,
in fp32 and (for DDP, FULL_SHARD and ZeRO-3) in bf16 mixed precision."""
from __future__ import annotations

import json

from bench.common import ROOT, TORCHRUN, Setup, env_for, run_logged

CASES = (("ddp", "-", "fp32"), ("fsdp", "FULL_SHARD", "fp32"), ("fsdp", "SHARD_GRAD_OP", "fp32"),
         ("fsdp", "HYBRID_SHARD", "fp32"), ("fsdp", "NO_SHARD", "fp32"), ("zero1", "-", "fp32"),
         ("zero2", "-", "fp32"), ("zero3", "-", "fp32"),
         ("ddp", "-", "bf16"), ("fsdp", "FULL_SHARD", "bf16"), ("zero3", "-", "bf16"))
CHECKED = ("fsdp FULL_SHARD", "zero3")


def memory(setup: Setup) -> dict:
    rows = []
    for strategy, sharding, precision in CASES:
        case = strategy if sharding == "-" else f"fsdp {sharding}"
        out = setup.out / "memory" / f"{case.replace(' ', '_')}_{precision}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [TORCHRUN, "--standalone", "--nproc-per-node=2", str(ROOT / "bench" / "memory_worker.py"), str(out),
                str(setup.model), str(setup.data), strategy, "FULL_SHARD" if sharding == "-" else sharding, precision]
        run_logged(argv, out.with_suffix(".log"), env_for(1))
        r = json.loads(out.read_text())
        rows.append({"case": case, "precision": precision, "bytes_per_rank": max(r["bytes_per_rank"]),
                     "parameters": r["parameters"]})
    meets = {}
    for r in rows:
        ddp = next(d["bytes_per_rank"] for d in rows if d["case"] == "ddp" and d["precision"] == r["precision"])
        r["of_ddp"] = r["bytes_per_rank"] / ddp
        if r["case"] in CHECKED:
            meets[f"{r['case']} {r['precision']}"] = r["bytes_per_rank"] <= ddp / 2 * 1.1
    return {"rows": rows, "meets": meets, "world_size": 2, "target": "FULL_SHARD and ZeRO-3 <= DDP/2 + 10%"}
