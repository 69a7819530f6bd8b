#!/usr/bin/env bash
# The benchmarks, end to end on a fresh machine: set-up, a local 2-node Slurm cluster, every part of
# `python -m bench` side by side in one run, then the cluster is stopped again.
#   bash bench/run.sh            # full run, results in bench/results/ (~80 min on 2 cores)
#   bash bench/run.sh --quick    # smoke run, results in artifacts/bench/quick/
set -euo pipefail
cd "$(dirname "$0")/.."
bash envs/setup.sh
bash envs/local-cluster.sh up
trap 'bash envs/local-cluster.sh down' EXIT
eval "$(bash envs/local-cluster.sh env)"
# shellcheck disable=SC1091
source .venv/bin/activate
python -m bench "$@"
