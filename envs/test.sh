#!/usr/bin/env bash
# The test suite on a fresh Debian 12 machine (root): set-up, a real 2-node local Slurm cluster,
# every test (unit + integration on that cluster), then the cluster is stopped again.
#   bash envs/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash envs/setup.sh
# The training tests write up to ~2 GB under the temp dir at once (a 1.2 GB model among them); a disk
# that fills mid-run fails unrelated tests with ENOSPC, so say it now instead.
tmp=${TMPDIR:-/tmp}
free_mib=$(df -Pm "$tmp" | awk 'NR == 2 {print $4}')
if [ "$free_mib" -lt 4096 ]; then
  echo "envs/test.sh: only ${free_mib} MiB free under $tmp; the tests need 4 GiB: free some space" \
       "(old runs: $tmp/pytest-of-$(id -un)) or point TMPDIR at a bigger disk" >&2
  exit 2
fi
bash envs/local-cluster.sh up --nodes 2
trap 'bash envs/local-cluster.sh down' EXIT
eval "$(bash envs/local-cluster.sh env)"
.venv/bin/python -m pytest -q "$@"
