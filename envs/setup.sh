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
# What is installed is read from the packages' metadata, not by importing them (importing torch, transformers,
# deepspeed, wandb and mlflow to check took 20 s of every test run).
installed() {
  "$PY" -I - "$@" <<'PYEOF' 2>/dev/null
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(name) for name in sys.argv[1:]) else 1)
PYEOF
}
torch_version() {
  "$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}
if [[ "$(torch_version)" != 2.13.0* ]]; then
  "$PY" -m pip install -q 'torch==2.13.0'
fi
if ! installed hpcft transformers deepspeed peft datasets submitit rich pytest wandb mlflow \
   || [ setup.cfg -nt "$VENV/.hpcft-installed" ]; then
  # The constraint keeps pip from replacing the torch installed above.
  "$PY" -m pip install -q -e '.[test]' --constraint <(echo 'torch==2.13.0')
  touch "$VENV/.hpcft-installed"
fi
echo "hpcft environment ready: $VENV (torch $(torch_version))"
