#!/usr/bin/env bash
# The test suite on a fresh Debian 12 machine (root): set-up, a real 2-node local Slurm cluster,
# every test (unit + integration on that cluster), then the cluster is stopped again.
#   bash envs/test.sh                 # everything, in three phases (below): what CI runs
#   bash envs/test.sh --quick         # the development loop: unit tests but the slow ones, and one
#                                     # representative job of each integration module (marker quick)
#   bash envs/test.sh [pytest args]   # just those, in one pytest run
# Three phases (tests/README.md says why): 1, the cluster tests, one at a time on HPCFT_TEST_WORKERS (1)
# xdist worker(s) (on 2 cores more workers kept the CPU oversubscribed and were slower; more cores, more
# workers); 2, the tests that assert wall-time bounds (marker quiet) on a quiet machine, 2 at a time;
# 3, the unit tests (no cluster) while the cluster tests that mostly wait (marker background: time
# limits) run beside them, then those that restart the cluster (cluster_restart), which no unit test
# minds.
set -euo pipefail
cd "$(dirname "$0")/.."
# CPU-seconds the machine has been busy, all cores (set-up included): the suite is CPU-bound, see the end
busy0=$(awk -v hz="$(getconf CLK_TCK)" 'NR == 1 {print ($2 + $3 + $4 + $7 + $8 + $9) / hz}' /proc/stat)
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
PYTEST=(.venv/bin/python -m pytest -q)
if [ "${1:-}" = "--quick" ]; then
  shift
  "${PYTEST[@]}" -n "${HPCFT_TEST_WORKERS:-2}" --no-loadscope-reorder \
    -m "(quick or not slurm) and not slow and not quiet and not cluster_restart" "$@"
  exit
fi
if [ $# -gt 0 ]; then
  "${PYTEST[@]}" "$@"
  exit
fi
rc=0
HPCFT_TEST_CPU_LOG=$(mktemp "${tmp}/hpcft-tests-cpu.XXXXXX")
export HPCFT_TEST_CPU_LOG
"${PYTEST[@]}" -n "${HPCFT_TEST_WORKERS:-1}" --no-loadscope-reorder \
  -m "slurm and not quiet and not background and not cluster_restart" || rc=$?
# quiet: the hang and SIGKILL jobs and the watchdog's timers, 2 at a time with nothing else running
"${PYTEST[@]}" -n 2 -m "quiet and not background and not cluster_restart" || rc=$((rc ? rc : $?))
beside=$(mktemp "${tmp}/hpcft-tests-beside.XXXXXX")
"${PYTEST[@]}" -m "background or cluster_restart" >"$beside" 2>&1 &
beside_pid=$!
"${PYTEST[@]}" -n "${HPCFT_TEST_WORKERS:-1}" --no-loadscope-reorder -m "not slurm and not quiet" || rc=$((rc ? rc : $?))
beside_rc=0
wait "$beside_pid" || beside_rc=$?
echo "--- beside the unit tests: the waiting cluster tests, then the cluster restarts (pytest exit $beside_rc)"
cat "$beside"
rm -f "$beside"
echo "--- where the CPU went (tests/conftest.py: the machine's CPU-seconds while each test ran), ${SECONDS} s wall"
.venv/bin/python -m tests.cpu_report "$HPCFT_TEST_CPU_LOG" --since "$busy0" || true
rm -f "$HPCFT_TEST_CPU_LOG"
exit $((rc ? rc : beside_rc))
