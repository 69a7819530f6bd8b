#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one machine: one slurmctld, one slurmd per node, each node
# in its own UTS namespace (distinct hostnames), 4 fake GPUs per node as gres (character devices).
#   bash envs/local-cluster.sh up [--nodes N]   # idempotent; waits until every node is idle
#   eval "$(bash envs/local-cluster.sh env)"    # SLURM_CONF for sbatch/srun/squeue
#   bash envs/local-cluster.sh kill-node node3  # a node lost for good (slurmd and its job processes)
#   bash envs/local-cluster.sh down             # cancels every job, stops every daemon, kills what jobs
#                                               # left behind, removes /etc/hosts lines
# Needs root (mknod, unshare, /etc/hosts). Facts behind it: shared/notes/local-slurm.md.
set -euo pipefail
DIR=${HPCFT_CLUSTER_DIR:-/var/tmp/hpcft-cluster}
CONF=$DIR/slurm.conf
NODE_CPUS=${HPCFT_CLUSTER_CPUS:-16}
NODE_GPUS=4
CLUSTER_NAME=hpcft-local  # Slurm exports it to every job as SLURM_CLUSTER_NAME: how down finds leftovers

log() { echo "local-cluster: $*" >&2; }

nodes_in_conf() { grep -c '^NodeName=' "$CONF" 2>/dev/null || echo 0; }

write_conf() {
  local n=$1 i
  mkdir -p "$DIR/spool" "$DIR/state" "$DIR/dev"
  {
    echo "# written by envs/local-cluster.sh"
    echo "ClusterName=$CLUSTER_NAME"
    echo "SlurmctldHost=localhost(127.0.0.1)"
    echo "SlurmctldPort=16817"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    # A requeued job waits cred_expire seconds (default 120) before it may start again.
    echo "AuthInfo=cred_expire=10"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmctldLogFile=$DIR/slurmctld.log"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SlurmdLogFile=$DIR/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core_Memory"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "MailProg=/bin/true"
    echo "DefMemPerCPU=500"
    echo "GresTypes=gpu"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$DIR/jobcomp.txt"
    echo "AccountingStorageType=accounting_storage/none"
    echo "MinJobAge=3600"
    echo "KillWait=10"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=60"
    # A pending job (a requeued one after cred_expire, one whose --after dependency just completed, one
    # waiting for GPUs) starts at the next scheduling pass: every 60 s (main) / 30 s (backfill) by default.
    # The suite queues dozens of jobs behind 8 fake GPUs, so passes come every 2 s here.
    echo "SchedulerParameters=sched_interval=2,bf_interval=2"
    # Job ids from the clock: a wiped state would restart them at 1 and collide with old run dirs.
    echo "FirstJobId=$(( ($(date +%s) / 10) % 1000000 + 1000 ))"
    for i in $(seq 1 "$n"); do
      echo "NodeName=node$i NodeHostname=node$i NodeAddr=127.0.1.$i Port=$((17000 + i)) CPUs=$NODE_CPUS RealMemory=16000 Gres=gpu:$NODE_GPUS"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF"
  : > "$DIR/gres.conf"
  for i in $(seq 1 "$n"); do
    for g in $(seq 0 $((NODE_GPUS - 1))); do
      local dev="$DIR/dev/node$i-gpu$g"
      [ -c "$dev" ] || mknod "$dev" c 1 3
      echo "NodeName=node$i Name=gpu File=$dev" >> "$DIR/gres.conf"
    done
  done
}

hosts_add() {
  local n=$1 i
  hosts_remove
  for i in $(seq 1 "$n"); do echo "127.0.1.$i node$i # hpcft-local-cluster" >> /etc/hosts; done
}

hosts_remove() {
  if grep -q '# hpcft-local-cluster' /etc/hosts; then
    # /etc/hosts may be a bind mount: rewrite in place instead of replacing the file.
    local tmp; tmp=$(mktemp); grep -v '# hpcft-local-cluster' /etc/hosts > "$tmp"; cat "$tmp" > /etc/hosts; rm -f "$tmp"
  fi
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if ! pgrep -x munged >/dev/null || [ ! -S /run/munge/munge.socket.2 ]; then
    pkill -x munged 2>/dev/null || true
    install -d -o munge -g munge -m 0755 /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    runuser -u munge -- /usr/sbin/munged
  fi
}

cluster_up() {
  local n=2
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n=$2; shift 2 ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      *) echo "local-cluster: unknown option $1 (use: up [--nodes N])" >&2; exit 2 ;;
    esac
  done
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "local-cluster: --nodes must be a positive integer (got '$n')" >&2; exit 2; }
  command -v slurmctld >/dev/null || { echo "local-cluster: slurmctld not installed; run: bash envs/setup.sh" >&2; exit 2; }
  export SLURM_CONF=$CONF
  if pid_alive "$DIR/slurmctld.pid" && [ "$(nodes_in_conf)" = "$n" ] && cluster_ready "$n"; then
    log "already up with $n nodes"; return 0
  fi
  cluster_down quiet
  write_conf "$n"
  hosts_add "$n"
  start_munge
  slurmctld -f "$CONF"
  local i
  for i in $(seq 1 "$n"); do
    mkdir -p "$DIR/spool/node$i"
    SLURM_CONF=$CONF unshare --uts -- sh -c "hostname node$i && exec slurmd -f '$CONF' -N node$i"
  done
  for _ in $(seq 1 60); do
    if cluster_ready "$n"; then log "up: $n nodes idle ($CONF)"; return 0; fi
    sleep 0.5
  done
  log "nodes did not become idle; sinfo says:"; sinfo -N -o '%N %T %E' >&2 || true
  exit 1
}

cluster_ready() {
  local n=$1 idle
  # completing counts as up: tests share the cluster, and one whose fixture asked while another's job was
  # ending must not restart it (that kills every job on it)
  idle=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated|completing)$' || true)
  [ "$idle" = "$n" ]
}

# Jobs first, while slurmd can still stop their steps: killing the daemons alone left the batch
# shell, srun, torchrun and the ranks running (and burning CPU) with nothing to stop them.
cancel_jobs() {
  pid_alive "$DIR/slurmctld.pid" || return 0
  local ids
  ids=$(SLURM_CONF=$CONF squeue -h -o '%i' 2>/dev/null || true)
  [ -n "$ids" ] || return 0
  # shellcheck disable=SC2086 # one id per word
  SLURM_CONF=$CONF scancel $ids 2>/dev/null || true
  for _ in $(seq 1 120); do  # KillWait=10 s plus slurmstepd's clean-up
    [ -z "$(SLURM_CONF=$CONF squeue -h -o '%i' 2>/dev/null)" ] && return 0
    sleep 0.25
  done
  log "jobs still listed after scancel: $(SLURM_CONF=$CONF squeue -h -o '%i %T' | tr '\n' ' ')"
}

# Any process still carrying this cluster's name in its environment belongs to one of its jobs
# (children inherit it): kill those left over once slurmstepd is gone. Never this shell or its parents.
kill_job_leftovers() {
  local keep=" $$ " p=$$ pid
  while [ "$p" -gt 1 ] 2>/dev/null; do p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || echo 1); keep="$keep$p "; done
  for pid in $(grep -lsxaF "SLURM_CLUSTER_NAME=$CLUSTER_NAME" --null-data /proc/[0-9]*/environ 2>/dev/null \
               | cut -d/ -f3); do
    case "$keep" in *" $pid "*) continue ;; esac
    kill -9 "$pid" 2>/dev/null || true
  done
}

cluster_down() {
  local f
  cancel_jobs
  for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  # Wait for them to exit, then make sure nothing is left (a slurmd can outlive its pid file).
  for _ in $(seq 1 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x slurmstepd >/dev/null || break
    sleep 0.25
  done
  pkill -9 -x slurmstepd 2>/dev/null || true
  pkill -9 -x slurmd 2>/dev/null || true
  pkill -9 -x slurmctld 2>/dev/null || true
  kill_job_leftovers
  pkill -x munged 2>/dev/null || true
  # munged exits asynchronously; an `up` right after `down` must not find the old one still there.
  for _ in $(seq 1 40); do pgrep -x munged >/dev/null || break; sleep 0.25; done
  hosts_remove
  rm -rf "$DIR/state" "$DIR/spool" "$DIR"/*.pid
  [ "${1:-}" = quiet ] || log "down"
}

# A node that never comes back: its slurmd and everything it started (slurmstepd, the job's launcher and
# ranks on that node) killed at once, as a power loss would. Each node lives in its own UTS namespace,
# so that namespace is exactly the node's processes. Slurm marks it DOWN after SlurmdTimeout.
node_kill() {
  local node=${1:-} pidfile ns pid
  [[ "$node" =~ ^node[0-9]+$ ]] || { echo "local-cluster: usage: kill-node nodeN" >&2; exit 2; }
  pidfile="$DIR/slurmd-$node.pid"
  pid_alive "$pidfile" || { echo "local-cluster: $node has no running slurmd" >&2; exit 2; }
  ns=$(readlink "/proc/$(cat "$pidfile")/ns/uts")
  [ "$ns" != "$(readlink /proc/$$/ns/uts)" ] || { echo "local-cluster: $node shares this shell's namespace" >&2; exit 2; }
  for pid in /proc/[0-9]*; do
    [ "$(readlink "$pid/ns/uts" 2>/dev/null)" = "$ns" ] && kill -9 "${pid#/proc/}" 2>/dev/null || true
  done
  rm -f "$pidfile"
  log "$node killed (slurmd and its jobs' processes); Slurm marks it DOWN after SlurmdTimeout"
}

case "${1:-}" in
  up) shift; cluster_up "$@" ;;
  kill-node) node_kill "${2:-}" ;;
  down) cluster_down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status) SLURM_CONF=$CONF sinfo -N -o '%N %T %G %c' ;;
  *) echo "usage: $0 up [--nodes N] | down | kill-node nodeN | env | status" >&2; exit 2 ;;
esac
