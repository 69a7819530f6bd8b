#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for hpcft: apt packages for the local Slurm cluster,
# a virtualenv at .venv with torch==2.13.0 installed BEFORE anything else (an unpinned torch pulls
# GBs of CUDA wheels), then hpcft itself in editable mode with its test extras.
#   bash envs/setup.sh            # idempotent; a second run takes seconds
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HPCFT_VENV:-.venv}

need_apt=()
for p in slurmctld slurmd slurm-client munge shellcheck time lmod; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PY" -m pip install -q 'torch==2.13.0'
fi
if ! "$PY" -c 'import hpcft, transformers, deepspeed, peft, datasets, submitit, rich, pytest, wandb, mlflow' 2>/dev/null \
   || [ setup.cfg -nt "$VENV/.hpcft-installed" ]; then
  # The constraint keeps pip from replacing the torch installed above.
  "$PY" -m pip install -q -e '.[test]' --constraint <(echo 'torch==2.13.0')
  touch "$VENV/.hpcft-installed"
fi
echo "hpcft environment ready: $VENV (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
