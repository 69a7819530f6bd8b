#!/usr/bin/env bash
# The main job end to end on a fresh Debian 12 machine (root): set-up, a 2-node local Slurm cluster,
# a tiny Llama built locally, then `hpcft submit --nodes 2 --gpus-per-node 4 jobs/samsum_tiny.yaml`
# (8 ranks: CPU processes here, one per granted GPU), and a summary of what it produced.
#   bash envs/demo.sh            # the cluster stays up afterwards: bash envs/local-cluster.sh down
set -euo pipefail
cd "$(dirname "$0")/.."
bash envs/setup.sh
bash envs/local-cluster.sh up --nodes 2
eval "$(bash envs/local-cluster.sh env)"
export PATH="$PWD/.venv/bin:$PATH"
[ -f artifacts/tiny-llama/config.json ] || hpcft make-tiny-model artifacts/tiny-llama
hpcft submit --nodes 2 --gpus-per-node 4 jobs/samsum_tiny.yaml --wait | tee /tmp/hpcft-demo.out
job=$(awk '$1 == "job" {print $2; exit}' /tmp/hpcft-demo.out)
python -m hpcft.demo_report "runs/samsum-tiny/$job"
