#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM tests and for trying `hydra/launcher=slurm`
# without a real cluster: installs Debian's slurm-wlm and munge, writes a slurm.conf for localhost
# and starts munged, slurmctld and slurmd as root. Idempotent: a running, unchanged cluster is left
# as it is; a changed slurm.conf restarts the daemons.
#   sudo .ci/slurm_up.sh        (or: make slurm-up)
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm_up.sh: must run as root (it installs packages and starts daemons); try: sudo make slurm-up" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

node=$(hostname -s)
cpus=$(nproc)
# slurmd drains a node that claims more memory than it has: leave 5% headroom.
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
partition=${SLURM_PARTITION_NAME:-local}
conf=/etc/slurm/slurm.conf

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
# Addresses are 127.0.0.1, so the host name need not resolve. No cgroups (containers rarely allow
# them): processes are tracked through /proc, tasks are not bound to cores. No accounting database:
# submitit's sacct calls fail and it learns that a job ended from the job's own result file.
new_conf=$(cat <<EOF
# Written by scripts/slurm_up.sh: a one-node cluster on localhost.
ClusterName=local
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
# Short waits, so that a cancelled or requeued job is gone (and back) within seconds.
KillWait=5
MinJobAge=60
SchedulerParameters=bf_interval=5
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=${partition} Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
)

changed=false
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$conf.tmp" && mv "$conf.tmp" "$conf"
  changed=true
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {
  if running "$1"; then
    kill "$(cat "$1")"
    for _ in $(seq 50); do running "$1" || break; sleep 0.2; done
  fi
}

if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
if ! running /run/munge/munged.pid; then
  runuser -u munge -- munged
fi

if [ "$changed" = true ]; then
  stop /run/slurmd.pid
  stop /run/slurmctld.pid
fi
running /run/slurmctld.pid || slurmctld
running /run/slurmd.pid || slurmd

# A node that was down (a stopped slurmd, an old configuration) comes back once slurmd is up.
for _ in $(seq 60); do
  state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
  case "$state" in
    idle|mix|alloc) echo "slurm_up.sh: node $node ($cpus CPUs, ${mem_mb} MB) is $state in partition $partition"; exit 0 ;;
    down*|drain*|drng*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "slurm_up.sh: node $node did not become idle (state: ${state:-no answer}); see /var/log/slurm/" >&2
exit 1
