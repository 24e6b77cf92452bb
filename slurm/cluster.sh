#!/usr/bin/env bash
# A real single-node Slurm cluster with accounting (slurmdbd + MariaDB), for tests and demos.
#
#   slurm/cluster.sh start    # start everything (idempotent: does nothing when already healthy)
#   slurm/cluster.sh status   # exit 0 iff every daemon is up and the node is idle/mixed/allocated
#   slurm/cluster.sh stop     # cancel all jobs, stop the daemons (a few seconds)
#   eval "$(slurm/cluster.sh env)"   # export SLURM_CONF=... so sbatch/srun/sacct find the cluster
#
# Needs root and the Debian packages munge slurmctld slurmd slurm-client slurmdbd mariadb-server
# slurm-wlm-mysql-plugin libpmix2 (scripts/bootstrap.sh installs them). No systemd is used.
#
# Environment:
#   REPLANDSCAPE_SLURM_DIR        state folder (default /tmp/replandscape-slurm): generated configs,
#                                 MariaDB data and socket, pid files, logs, spool and state
#   REPLANDSCAPE_SLURM_PORT_BASE  slurmctld port; slurmd uses +1, slurmdbd +2 (default 6817)
#   REPLANDSCAPE_SLURM_CPUS       CPUs of the node (default: nproc)
#   REPLANDSCAPE_SLURM_TIMEOUT    seconds allowed for each wait (default 30)
#   REPLANDSCAPE_SLURM_KEEP_JOBS  1: keep the jobs that slurmctld recovers from an earlier run
#                                 (by default start cancels them, e.g. after a crash)
#
# Layout of the state folder: etc/ (slurm.conf, slurmdbd.conf mode 600), mysql/ (data),
# run/ (pid files, MariaDB socket), log/, spool/ (slurmd), state/ (slurmctld).
# Every wait is bounded; on failure the tail of the relevant daemon log is printed and the
# script exits non-zero. Pid files of dead processes (a stale state folder) are ignored.
set -euo pipefail

STATE=${REPLANDSCAPE_SLURM_DIR:-/tmp/replandscape-slurm}
PORT_BASE=${REPLANDSCAPE_SLURM_PORT_BASE:-6817}
TIMEOUT=${REPLANDSCAPE_SLURM_TIMEOUT:-30}
export PATH=/usr/sbin:/sbin:$PATH

ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
SLURM_CONF_FILE=$ETC/slurm.conf
DB_DIR=$STATE/mysql
DB_SOCK=$RUN/mysqld.sock
DB_PID=$RUN/mysqld.pid
DB_NAME=slurm_acct_db
DB_USER=slurm
MUNGE_DIR=/run/munge
MUNGE_PID=$MUNGE_DIR/munged.pid
CLUSTER=replandscape
PARTITION=local
NODE=$(hostname -s)

export SLURM_CONF=$SLURM_CONF_FILE
export MYSQL_UNIX_PORT=$DB_SOCK   # slurmdbd's MySQL client library would use /run/mysqld otherwise

log() { printf '[cluster.sh] %s\n' "$*" >&2; }

die() {  # die MESSAGE [LOGFILE...]: print the message and the tail of each log, exit 1
  local msg=$1; shift
  log "ERROR: $msg"
  local f
  for f in "$@"; do
    if [ -f "$f" ]; then
      printf -- '----- tail of %s -----\n' "$f" >&2
      tail -n 25 "$f" >&2 || true
    fi
  done
  exit 1
}

# pid_alive PIDFILE NAME: the pid in PIDFILE is a live (not zombie) process called NAME.
# Zombies are common here (pid 1 may not reap), so `kill -0` is not enough; checking the
# command name guards against a stale pid file whose pid was reused.
pid_of() { [ -s "$1" ] && { tr -dc '0-9' <"$1"; } 2>/dev/null; }
pid_alive() {
  local pid
  pid=$(pid_of "$1") || return 1
  proc_alive "$pid" "$2"
}
proc_alive() {  # proc_alive PID NAME
  local pid=$1 stat comm
  [ -n "$pid" ] || return 1
  stat=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
  [[ -n $stat && $stat != Z* ]] || return 1
  comm=$(ps -o comm= -p "$pid" 2>/dev/null) || return 1
  [ "$comm" = "$2" ]
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.1 s until it succeeds or time runs out.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# stop_pidfile PIDFILE NAME: SIGTERM, wait (bounded), then SIGKILL. The pid is read once:
# slurmd removes its pid file as soon as it gets SIGTERM, long before it has exited.
stop_pidfile() {
  local pidfile=$1 name=$2 pid
  if pid_alive "$pidfile" "$name"; then
    pid=$(pid_of "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do  # up to 5 s
      proc_alive "$pid" "$name" || break
      sleep 0.1
    done
    if proc_alive "$pid" "$name"; then
      log "$name (pid $pid) still running 5 s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
  fi
  rm -f "$pidfile"
}

# Another cluster on the same ports would answer our health checks (sacctmgr, scontrol ping) while
# our own daemon failed to bind: refuse to start a daemon whose port is taken.
port_free() {  # port_free PORT DAEMON
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "port $1 for $2 is already in use (another Slurm cluster? stop it, or set REPLANDSCAPE_SLURM_PORT_BASE)"
  fi
}

# Client commands retry for many seconds when slurmctld is down: ask only a live one, with a timeout.
node_state() {
  pid_alive "$RUN/slurmctld.pid" slurmctld || return 0
  timeout 10 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1
}
queued_jobs() {
  pid_alive "$RUN/slurmctld.pid" slurmctld || return 0
  timeout 10 squeue -h -o '%A' 2>/dev/null || true
}
queue_empty() { [ -z "$(queued_jobs)" ]; }
node_ok() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping >/dev/null 2>&1; }
dbd_ok() { timeout 10 sacctmgr -n list cluster >/dev/null 2>&1; }

healthy() {
  [ -f "$SLURM_CONF_FILE" ] &&
    pid_alive "$DB_PID" mariadbd &&
    munge_ok &&
    pid_alive "$RUN/slurmdbd.pid" slurmdbd &&
    pid_alive "$RUN/slurmctld.pid" slurmctld &&
    pid_alive "$RUN/slurmd.pid" slurmd &&
    node_ok
}

check_binaries() {
  local b missing=()
  for b in mariadbd mariadb-install-db mariadb mariadb-admin munged munge slurmdbd slurmctld slurmd \
    sinfo squeue scancel sacctmgr scontrol; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing programs: ${missing[*]} (install the packages listed in the header)"
  [ "$(id -u)" = 0 ] || die "must run as root (SlurmUser=root, munged is started as the munge user)"
}

write_configs() {
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/spool" "$STATE/state"
  chmod 755 "$STATE" "$ETC" "$RUN" "$LOG"
  local cpus mem_kb real_mem def_mem
  cpus=${REPLANDSCAPE_SLURM_CPUS:-$(nproc)}
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  real_mem=$((mem_kb / 1024 - 1024))
  [ "$real_mem" -ge 512 ] || real_mem=512
  # An equal share per CPU: jobs that ask for no --mem can fill every CPU of the node.
  def_mem=$((real_mem / cpus))

  local tmp=$SLURM_CONF_FILE.tmp
  cat >"$tmp" <<EOF
# Generated by slurm/cluster.sh; edits are overwritten at the next start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=pmix
MailProg=/bin/true
MinJobAge=3600
JobRequeue=1
ReturnToService=2
KillWait=5
InactiveLimit=0
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT_BASE + 2))
JobCompType=jobcomp/none
# schedule at once (the default delays batch jobs by up to 3 s)
SchedulerParameters=batch_sched_delay=0,kill_invalid_depend
DefMemPerCPU=$def_mem
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$tmp" "$SLURM_CONF_FILE"
  chmod 644 "$SLURM_CONF_FILE"
  # PMIx step folders under the state folder: the default (/tmp/spmix_appdir_<uid>_<job>.<step>)
  # outlives a cluster, and a later cluster that reuses the job id then fails to launch the step
  mkdir -p "$STATE/pmix"
  printf '# Generated by slurm/cluster.sh\nPMIxCliTmpDirBase=%s\n' "$STATE/pmix" >"$ETC/mpi.conf"
  chmod 644 "$ETC/mpi.conf"

  local pass
  pass=$(db_password)
  tmp=$ETC/slurmdbd.conf.tmp
  (umask 077 && cat >"$tmp" <<EOF
# Generated by slurm/cluster.sh; edits are overwritten at the next start.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$pass
EOF
  )
  chmod 600 "$tmp"
  mv "$tmp" "$ETC/slurmdbd.conf"
}

db_password() {  # a random password, made once per state folder (mode 600)
  local f=$ETC/db.pass
  if [ ! -s "$f" ]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$f")
  fi
  cat "$f"
}

start_mariadb() {
  pid_alive "$DB_PID" mariadbd && db_ok && return 0
  stop_pidfile "$DB_PID" mariadbd   # a live but unresponsive server
  if [ ! -f "$DB_DIR/.replandscape-initialized" ]; then
    log "initialising MariaDB data folder $DB_DIR"
    rm -rf "$DB_DIR"
    mkdir -p "$DB_DIR"
    # Run as root so that any state folder works (mysql may not traverse e.g. pytest's tmp folders).
    mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root \
      --auth-root-authentication-method=socket --skip-test-db --skip-name-resolve \
      >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed" "$LOG/mariadb-install.log"
    touch "$DB_DIR/.replandscape-initialized"
  fi
  rm -f "$DB_SOCK" "$DB_PID"
  log "starting mariadbd"
  setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCK" \
    --pid-file="$DB_PID" --skip-networking --skip-name-resolve --innodb-buffer-pool-size=256M \
    --log-error="$LOG/mariadb.log" </dev/null 9>&- >>"$LOG/mariadb.log" 2>&1 &
  wait_for "$TIMEOUT" db_ok || die "mariadbd did not answer within ${TIMEOUT}s" "$LOG/mariadb.log"
  wait_for 5 pid_alive "$DB_PID" mariadbd || die "mariadbd wrote no pid file" "$LOG/mariadb.log"
}

setup_database() {
  local pass
  pass=$(db_password)
  mariadb --no-defaults --socket="$DB_SOCK" -uroot >"$LOG/mariadb-setup.log" 2>&1 <<EOF || die "creating $DB_NAME failed" "$LOG/mariadb-setup.log"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_munge() {
  munge_ok && return 0
  mkdir -p "$MUNGE_DIR"
  chown munge:munge "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge && chown munge:munge /etc/munge && chmod 700 /etc/munge
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  stop_pidfile "$MUNGE_PID" munged   # a live but unresponsive one
  rm -f "$MUNGE_DIR/munge.socket.2" "$MUNGE_DIR/munge.socket.2.lock"
  # munged insists on a log file owned by the munge user, in a folder it can reach
  local mlog=$LOG/munge
  mkdir -p "$mlog" && chown munge:munge "$mlog"
  runuser -u munge -- test -w "$mlog" || mlog=$MUNGE_DIR
  log "starting munged"
  runuser -u munge -- munged --force --log-file="$mlog/munged.log" \
    </dev/null 9>&- >>"$LOG/munged.out" 2>&1 || die "munged failed to start" "$LOG/munged.out" "$mlog/munged.log"
  touch "$RUN/munged.ours"   # stop only a munged that this script started
  wait_for "$TIMEOUT" munge_ok || die "munge did not answer within ${TIMEOUT}s" "$mlog/munged.log"
}

start_slurmdbd() {
  pid_alive "$RUN/slurmdbd.pid" slurmdbd && dbd_ok && return 0
  stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
  port_free $((PORT_BASE + 2)) slurmdbd
  log "starting slurmdbd"
  setsid slurmdbd </dev/null 9>&- >>"$LOG/slurmdbd.log" 2>&1 || die "slurmdbd failed to start" "$LOG/slurmdbd.log"
  wait_for "$TIMEOUT" dbd_ok ||
    die "slurmdbd did not answer sacctmgr within ${TIMEOUT}s" "$LOG/slurmdbd.log" "$LOG/mariadb.log"
  wait_for 5 pid_alive "$RUN/slurmdbd.pid" slurmdbd || die "slurmdbd is not running" "$LOG/slurmdbd.log"
}

start_slurmctld() {
  pid_alive "$RUN/slurmctld.pid" slurmctld && return 0
  port_free "$PORT_BASE" slurmctld
  log "starting slurmctld"
  setsid slurmctld </dev/null 9>&- >>"$LOG/slurmctld.log" 2>&1 || die "slurmctld failed to start" "$LOG/slurmctld.log"
  wait_for "$TIMEOUT" scontrol ping ||
    die "slurmctld did not answer within ${TIMEOUT}s" "$LOG/slurmctld.log" "$LOG/slurmdbd.log"
  wait_for 5 pid_alive "$RUN/slurmctld.pid" slurmctld || die "slurmctld is not running" "$LOG/slurmctld.log"
}

start_slurmd() {
  pid_alive "$RUN/slurmd.pid" slurmd && return 0
  port_free $((PORT_BASE + 1)) slurmd
  log "starting slurmd"
  setsid slurmd </dev/null 9>&- >>"$LOG/slurmd.log" 2>&1 || die "slurmd failed to start" "$LOG/slurmd.log"
}

wait_node() {
  local deadline=$((SECONDS + TIMEOUT)) st
  while :; do
    st=$(node_state)
    case "$st" in
      idle | mixed | allocated | completing) return 0 ;;
      # left drained or down by an earlier run: put the node back in service
      *drain* | down* | fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] ||
      die "node $NODE not idle within ${TIMEOUT}s (state: ${st:-none})" "$LOG/slurmd.log" "$LOG/slurmctld.log"
    sleep 0.1
  done
}

# After a crash, slurmctld recovers the jobs of the earlier run from its state folder (and their
# surviving slurmstepd processes re-attach to the new slurmd): cancel them so that tests start on
# an idle node. REPLANDSCAPE_SLURM_KEEP_JOBS=1 keeps them.
cancel_leftover_jobs() {
  local ids
  ids=$(queued_jobs)
  [ -n "$ids" ] || return 0
  if [ "${REPLANDSCAPE_SLURM_KEEP_JOBS:-0}" = 1 ]; then
    log "keeping $(wc -w <<<"$ids") job(s) left by an earlier run"
    return 0
  fi
  log "cancelling $(wc -w <<<"$ids") job(s) left by an earlier run"
  # shellcheck disable=SC2086
  scancel $ids >/dev/null 2>&1 || true
  wait_for "$TIMEOUT" queue_empty || die "jobs of an earlier run still in the queue after ${TIMEOUT}s" "$LOG/slurmd.log"
}

cmd_start() {
  check_binaries
  if healthy; then
    log "already running ($STATE)"
    return 0
  fi
  local ctld_was_down=0
  pid_alive "$RUN/slurmctld.pid" slurmctld || ctld_was_down=1
  write_configs
  start_mariadb
  setup_database
  start_munge
  start_slurmdbd
  start_slurmctld
  start_slurmd
  wait_node
  [ "$ctld_was_down" = 0 ] || cancel_leftover_jobs
  # sacct must know the cluster (slurmctld registers it with slurmdbd when it starts)
  wait_for "$TIMEOUT" sacct -n -X -S now ||
    die "sacct does not answer within ${TIMEOUT}s" "$LOG/slurmctld.log" "$LOG/slurmdbd.log"
  healthy || die "the cluster is not healthy after its start" "$LOG/slurmctld.log" "$LOG/slurmd.log" "$LOG/slurmdbd.log"
  log "running: cluster $CLUSTER, partition $PARTITION, node $NODE ($STATE)"
}

# Pids of the processes of this cluster's jobs that are still running or completing: its
# slurmstepd processes (they inherit our SLURM_CONF from slurmd), processes whose environment
# has our SLURM_CONF and a SLURM_JOB_ID (an srun of a batch script outlives the script's
# slurmstepd for a few seconds: proctrack/linuxproc loses it when it is reparented), and
# everything below them. This script and its ancestors are never listed.
job_processes() {
  local f p roots=() mine=" " q=$$
  while [ -n "$q" ] && [ "$q" -gt 1 ]; do
    mine+="$q "
    q=$(ps -o ppid= -p "$q" 2>/dev/null | tr -d ' ')
  done
  for f in $(grep -lzxF "SLURM_CONF=$SLURM_CONF_FILE" /proc/[0-9]*/environ 2>/dev/null || true); do
    p=${f#/proc/} && p=${p%/environ}
    [[ $mine == *" $p "* ]] && continue
    if [ "$(ps -o comm= -p "$p" 2>/dev/null)" = slurmstepd ] || grep -qz '^SLURM_JOB_ID=' "$f" 2>/dev/null; then
      roots+=("$p")
    fi
  done
  [ ${#roots[@]} -gt 0 ] || return 0
  ps -e -o pid=,ppid= | awk -v roots="${roots[*]}" -v mine="$mine" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2 }
    END {
      do { changed = 0
        for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
      } while (changed)
      for (p in keep) if (index(mine, " " p " ") == 0) print p
    }'
}

cmd_stop() {
  local ids pids
  ids=$(queued_jobs)
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    scancel $ids >/dev/null 2>&1 || true
    # Plain jobs leave the queue at once; a job with an srun step stays COMPLETING for KillWait
    # (about 5 s): do not wait for it, its processes are killed below.
    wait_for 2 queue_empty || log "jobs still completing: killing their processes"
  fi
  pids=$(job_processes)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  stop_pidfile "$RUN/slurmd.pid" slurmd
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
  stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
  if [ -f "$RUN/munged.ours" ]; then
    stop_pidfile "$MUNGE_PID" munged
    rm -f "$RUN/munged.ours"
  fi
  stop_pidfile "$DB_PID" mariadbd
  log "stopped ($STATE)"
}

cmd_status() {
  local ok=0 d
  for d in mysqld:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld slurmd:slurmd; do
    if pid_alive "$RUN/${d%%:*}.pid" "${d#*:}"; then
      echo "${d#*:}: running (pid $(pid_of "$RUN/${d%%:*}.pid"))"
    else
      echo "${d#*:}: not running"
      ok=1
    fi
  done
  if munge_ok; then echo "munge: ok"; else echo "munge: not answering"; ok=1; fi
  local st=""
  [ -f "$SLURM_CONF_FILE" ] && st=$(node_state)
  if [[ $st =~ ^(idle|mixed|allocated|completing)$ ]]; then
    echo "node $NODE: $st"
  else
    echo "node $NODE: ${st:-unknown} (not usable)"
    ok=1
  fi
  return $ok
}

cmd_env() {
  printf 'export SLURM_CONF=%q\n' "$SLURM_CONF_FILE"
  printf 'export REPLANDSCAPE_SLURM_DIR=%q\n' "$STATE"
}

# start and stop take a lock, so that concurrent callers (e.g. pytest workers) do not race.
# Daemons are started with fd 9 closed (9>&-): an inherited lock would be held forever.
with_lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w $((TIMEOUT * 4)) 9 || die "another cluster.sh holds $STATE/.lock"
  "$@"
}

case "${1:-}" in
  start) with_lock cmd_start ;;
  stop) with_lock cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
