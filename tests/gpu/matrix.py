"""The GPU check behind `bash tests/gpu/run.sh`: hpcft's real code paths on whatever GPUs this machine
has, one results table (markdown + JSON), a non-zero exit on any failure.

    python tests/gpu/matrix.py --out artifacts/gpu            # on a machine with CUDA (run.sh calls this)
    python tests/gpu/matrix.py --out /tmp/gpu --cpu-smoke     # the harness itself on CPU ranks, a tiny model

On GPUs: a ~1B-parameter Llama built from config (no hub) and the tiny BPE tokenizer, bf16, every
strategy (ddp, fsdp, zero1-3) with and without LoRA; QLoRA (4-bit) when bitsandbytes is installed;
sdpa and flash_attention_2 (when flash-attn is installed); resume round trips (stopped, resumed,
the same losses as one run; once with async checkpoints); the export reloaded in one process with
the run's eval loss; MFU against the datasheet peak hpcft picked; NCCL when there are 2+ GPUs. Each
case is `torchrun -m hpcft.train`, as a job's ranks run it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass
class Case:
    name: str
    flags: list[str]
    checks: list[str] = field(default_factory=list)  # extra checks: "resume", "export"


@dataclass
class Result:
    case: str
    ok: bool
    seconds: float
    detail: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    eval_loss: float | None = None
    backend: str | None = None
    peak_source: str | None = None


def cases(*, gpus: int, smoke: bool) -> list[Case]:
    import importlib.util

    strategies = ["ddp", "fsdp"] if smoke else ["ddp", "fsdp", "zero1", "zero2", "zero3"]
    precision = [] if smoke else ["--precision=bf16"]
    out = []
    for strategy in strategies:
        for lora in (False, True) if not smoke else (False,):
            flags = [f"--strategy={strategy}", *precision] + (["--use_peft=true", "--lr=1e-3"] if lora else [])
            out.append(Case(f"{strategy}{' + LoRA' if lora else ''}", flags, ["export"] if strategy in ("fsdp", "zero3") else []))
    out.append(Case("fsdp resume", ["--strategy=fsdp", *precision], ["resume"]))
    out.append(Case("ddp resume, async checkpoint", ["--strategy=ddp", "--async_checkpoint=true", "--save_every=2",
                                                     *precision], ["resume"]))
    if not smoke and importlib.util.find_spec("bitsandbytes"):
        out.append(Case("QLoRA 4-bit (ddp)", ["--strategy=ddp", "--use_peft=true", "--quantization=4bit", *precision]))
    if not smoke and importlib.util.find_spec("flash_attn"):
        out.append(Case("fsdp + flash_attention_2", ["--strategy=fsdp", "--attn_implementation=flash_attention_2",
                                                     *precision]))
    return out


def build_model(out: Path, *, smoke: bool) -> Path:
    """The tiny tokenizer with a ~1B Llama (hidden 2048, 16 layers) built from config; on --cpu-smoke
    the tiny model itself."""
    model = out / ("tiny" if smoke else "llama-1b")
    if (model / "config.json").exists():
        return model
    size = [] if smoke else ["--hidden-size", "2048", "--layers", "16", "--heads", "16"]
    subprocess.run([PY, "-m", "hpcft.cli", "make-tiny-model", str(model), *size], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return model


def torchrun(nproc: int, flags: list[str], run_dir: Path, log: Path, timeout: float) -> int:
    env = dict(os.environ, HPCFT_RUN_DIR=str(run_dir), PYTHONUNBUFFERED="1")
    argv = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "hpcft.train", *flags]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        return subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_case(case: Case, base: list[str], nproc: int, out: Path, *, timeout: float) -> Result:
    start = time.time()
    run_dir = out / "runs" / case.name.replace(" ", "_").replace("+", "plus")
    log = run_dir.with_suffix(".log")
    flags = [*base, *case.flags]
    try:
        if "resume" in case.checks:
            whole, half = run_dir.with_name(run_dir.name + "_whole"), run_dir
            if torchrun(nproc, flags, whole, log.with_name(log.stem + "_whole.log"), timeout):
                return Result(case.name, False, time.time() - start, f"uninterrupted run failed: see {log}")
            if torchrun(nproc, [*flags, "--max_steps_this_run=3"], half, log, timeout) or \
                    torchrun(nproc, flags, half, log.with_name(log.stem + "_resumed.log"), timeout):
                return Result(case.name, False, time.time() - start, f"stopped or resumed run failed: see {log}")
            a, b = losses(whole), losses(half)
            worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
            if set(a) != set(b) or worst > 2e-2:
                return Result(case.name, False, time.time() - start, f"resumed losses differ ({worst:.1e} relative)")
        elif torchrun(nproc, flags, run_dir, log, timeout):
            return Result(case.name, False, time.time() - start, f"failed: see {log}")
        s = json.loads((run_dir / "summary.json").read_text())
        detail = "ok"
        if "resume" in case.checks:
            detail = f"stopped at 3, resumed: losses within {worst:.1e} of one run"
        if "export" in case.checks:
            proc = subprocess.run([PY, "-m", "hpcft.train.evaluate", f"--model_name={run_dir / 'model'}",
                                   *[f for f in base if f.startswith(("--data_path", "--context_length", "--val"))]],
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                return Result(case.name, False, time.time() - start, f"export reload failed: {proc.stderr[-500:]}")
            reloaded = json.loads(proc.stdout.strip().splitlines()[-1])["eval_loss"]
            if abs(reloaded - s["eval_loss_after"]) > 2e-2 * abs(s["eval_loss_after"]):
                return Result(case.name, False, time.time() - start,
                              f"exported model's eval loss {reloaded:.4f} != the run's {s['eval_loss_after']:.4f}")
            detail = f"export reloads: eval {reloaded:.4f} (run {s['eval_loss_after']:.4f})"
        if nproc > 1 and s["device"] == "cuda" and s["backend"] != "nccl":
            return Result(case.name, False, time.time() - start, f"backend {s['backend']} on {nproc} GPUs, not nccl")
        peak = max(s.get("peak_memory_bytes_per_rank") or [0]) / 2**30
        return Result(case.name, True, time.time() - start, detail, s.get("tokens_per_s"), s.get("mfu"), peak,
                      s.get("eval_loss_after"), s.get("backend"), s.get("peak_flops_source"))
    except subprocess.TimeoutExpired:
        return Result(case.name, False, time.time() - start, f"timed out after {timeout:.0f} s: see {log}")


def table(results: list[Result], device: str) -> str:
    lines = [f"GPU check on {device}", "",
             "| case | ok | tokens/s | MFU | peak GiB/rank | eval loss | backend | detail |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.case} | {'yes' if r.ok else 'FAILED'} | {r.tokens_per_s or '-'} | "
                     f"{f'{r.mfu:.1%}' if r.mfu else '-'} | {f'{r.peak_gib:.1f}' if r.peak_gib else '-'} | "
                     f"{f'{r.eval_loss:.4f}' if r.eval_loss else '-'} | {r.backend or '-'} | {r.detail} |")
    sources = sorted({r.peak_source for r in results if r.peak_source})
    return "\n".join(lines) + ("\n\nMFU peaks: " + "; ".join(sources) if sources else "") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "gpu"))
    ap.add_argument("--cpu-smoke", action="store_true", help="the harness on CPU ranks with the tiny model")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per torchrun")
    args = ap.parse_args(argv)
    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("tests/gpu/matrix.py: no CUDA device (torch.cuda.is_available() is False): nothing to check here; "
              "run it on a machine with NVIDIA GPUs (or --cpu-smoke for the harness itself)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if not smoke else 0
    nproc = gpus if gpus else 2
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "2 CPU ranks (smoke)"
    model = build_model(out, smoke=smoke)
    base = [f"--model_name={model}", f"--data_path={ROOT / 'data' / 'samsum_tiny.jsonl'}", "--dataset=samsum",
            f"--max_train_step={args.steps}", "--context_length=512", "--batch_size_training=4", "--val_batch_size=8",
            "--max_eval_step=4", "--warmup_steps=2", "--lr=1e-4", "--plot=false", f"--data_cache_dir={out / 'data-cache'}"]
    results = []
    for case in cases(gpus=gpus, smoke=smoke):
        print(f"gpu-check: {case.name} ...", flush=True)
        results.append(run_case(case, base, nproc, out, timeout=args.timeout))
        print(f"gpu-check: {case.name}: {'ok' if results[-1].ok else 'FAILED'} ({results[-1].detail})", flush=True)
    text = table(results, device)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                  "results": [asdict(r) for r in results]}, indent=1) + "\n")
    print(text)
    failed = [r.case for r in results if not r.ok]
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
