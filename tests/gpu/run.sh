#!/usr/bin/env bash
# The GPU check, one command for whoever has NVIDIA GPUs (not part of CI): every strategy with and
# without LoRA on a ~1B Llama in bf16, QLoRA and flash-attention 2 when installed, a resume round trip,
# the export reloaded, MFU against the datasheet peak, NCCL on 2+ GPUs. Writes artifacts/gpu/results.md
# and results.json; exits non-zero on any failure; without CUDA it says so and exits 0.
#   bash tests/gpu/run.sh [--out DIR] [--steps N] [--timeout SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${HPCFT_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import hpcft, torch, transformers, deepspeed, peft' >/dev/null 2>&1; then
  echo "tests/gpu/run.sh: $PY lacks hpcft or its packages; install them (bash envs/setup.sh, or pip install -e . with a CUDA torch)" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "tests/gpu/run.sh: no CUDA device here (torch.cuda.is_available() is False): skipped, nothing checked"
  exit 0
fi
exec "$PY" tests/gpu/matrix.py "$@"
