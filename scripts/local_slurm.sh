#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests and CI (no systemd needed):
# munged, MariaDB + slurmdbd (job accounting, so sacct sees cancelled and crashed jobs),
# slurmctld and slurmd, with 2 fake GPUs (gres) so that GPU jobs schedule and see CUDA_VISIBLE_DEVICES.
#
#   scripts/local_slurm.sh up      install (Debian packages) if missing, configure, start; idempotent
#   scripts/local_slurm.sh down    stop the daemons this script started (by their pid files)
#   scripts/local_slurm.sh status
#
# Runs as root. Writes /etc/slurm/{slurm.conf,slurmdbd.conf,gres.conf}; state, logs and pid files
# live in $LOCAL_SLURM_DIR (default /tmp/outlier_hydra_slurm). Each `up` after a `down` starts from a
# clean controller state, so job ids restart: use a fresh submitit folder per test.
set -euo pipefail

STATE=${LOCAL_SLURM_DIR:-/tmp/outlier_hydra_slurm}
RUN=$STATE/run
HOST=$(hostname -s)
CLUSTER=local
PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"

log() { echo "local_slurm: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "timed out waiting for $what"; return 1
}

install_packages() {
  local missing=""
  for cmd in slurmctld slurmd sbatch slurmdbd munged mariadbd; do
    command -v "$cmd" >/dev/null 2>&1 || missing=1
  done
  [ -z "$missing" ] && return 0
  log "installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

write_configs() {
  local mem cpus
  cpus=$(nproc)
  mem=$(( $(free -m | awk '/^Mem:/ {print $7}') * 9 / 10 ))
  mkdir -p /etc/slurm "$STATE"/{log,spool/ctld,spool/d,dev,mysql} "$RUN"
  for i in 0 1; do [ -e "$STATE/dev/gpu$i" ] || mknod "$STATE/dev/gpu$i" c 1 3; done
  cat > /etc/slurm/slurm.conf <<EOF
# written by outlier_hydra scripts/local_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
MinJobAge=3600
# scancel sends SIGTERM, which submitit jobs ignore (Slurm sends it before pre-emption too), then
# SIGKILL after KillWait seconds: 2 here so that cancelled test jobs die at once (clusters use ~30)
KillWait=2
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > /etc/slurm/gres.conf <<EOF
NodeName=$HOST Name=gpu File=$STATE/dev/gpu[0-1]
EOF
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

munge_ok() { munge -n </dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged --force
  touch "$RUN/munged.ours"
  wait_for 10 munged munge_ok
}

start_mariadb() {
  alive "$RUN/mariadb.pid" && return 0
  mkdir -p /run/mysqld
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket >/dev/null
  fi
  # socket only (no TCP port); root authenticates by unix socket, which is how slurmdbd (root) connects
  mariadbd --user=root --datadir="$STATE/mysql" --socket=/run/mysqld/mysqld.sock --skip-networking \
    --pid-file="$RUN/mariadb.pid" --log-error="$STATE/log/mariadb.log" &
  wait_for 30 mariadb mariadb --socket=/run/mysqld/mysqld.sock -e "select 1"
}

start_slurm() {
  if ! alive "$RUN/slurmdbd.pid"; then
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  if ! alive "$RUN/slurmctld.pid"; then
    rm -rf "$STATE/spool/ctld"/*   # clean controller state: job ids restart
    slurmctld -c -i
    wait_for 30 slurmctld scontrol ping
  fi
  if ! alive "$RUN/slurmd.pid"; then
    slurmd -N "$HOST"
  fi
  wait_for 30 "node $HOST idle" sh -c "sinfo -h -N -o '%t' | grep -Eq '^(idle|mix|alloc)'"
}

up() {
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurm
  log "up: $(sinfo -h -N -o '%N %t %G' | head -n1); accounting: $(sacctmgr -n list cluster format=cluster | xargs)"
}

down() {
  for d in slurmd slurmctld slurmdbd mariadb; do
    if alive "$RUN/$d.pid"; then
      kill "$(cat "$RUN/$d.pid")" || true
      for _ in $(seq 100); do alive "$RUN/$d.pid" || break; sleep 0.1; done
    fi
    rm -f "$RUN/$d.pid"
  done
  if [ -f "$RUN/munged.ours" ]; then
    pkill -x munged || true
    for _ in $(seq 100); do pgrep -x munged >/dev/null || break; sleep 0.1; done
    rm -f "$RUN/munged.ours"
  fi
  log "down"
}

status() {
  for d in munged slurmdbd slurmctld slurmd; do
    if pgrep -x "$d" >/dev/null; then echo "$d: running"; else echo "$d: stopped"; fi
  done
  if alive "$RUN/mariadb.pid"; then echo "mariadb: running"; else echo "mariadb: stopped"; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
