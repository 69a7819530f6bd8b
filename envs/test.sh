#!/usr/bin/env bash
# The test suite on a fresh Debian 12 machine (root): set-up, a real 2-node local Slurm cluster,
# every test (unit + integration on that cluster), then the cluster is stopped again.
#   bash envs/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash envs/setup.sh
bash envs/local-cluster.sh up --nodes 2
trap 'bash envs/local-cluster.sh down' EXIT
eval "$(bash envs/local-cluster.sh env)"
.venv/bin/python -m pytest -q "$@"
