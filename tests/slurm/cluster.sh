#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for ftcl's integration tests.
#
#   tests/slurm/cluster.sh start    install (if missing), configure and start; idempotent
#   tests/slurm/cluster.sh stop     cancel all jobs, then end every daemon this script started
#   tests/slurm/cluster.sh status   sinfo and daemon PIDs; exit 0 only when the cluster is up
#
# Needs root on Debian 12 (Slurm 22.05.8, MUNGE 0.5.15, MariaDB 10.11) and no systemd: the
# daemons are started by hand.  Client commands need SLURM_CONF=$FTCL_SLURM_ROOT/etc/slurm.conf
# unless /etc/slurm/slurm.conf is free, in which case it becomes a symlink to that file.
#
# Environment:
#   FTCL_SLURM_ROOT     (/tmp/ftcl-slurm) config, state, spool, logs, PID files, MariaDB data.
#                       Users munge and mysql must be able to traverse it and its parents.
#                       Kept across stop/start, so job ids keep growing and the accounting
#                       database stays consistent with them; delete the folder for a fresh cluster.
#   FTCL_SLURM_CPUS     (8) CPUs the node advertises; more than the machine has, so several
#                       1-CPU jobs run at once (SlurmdParameters=config_overrides).
#   FTCL_SLURM_GPUS     (2) fake GPUs: char devices made with mknod, so --gpus-per-node jobs
#                       schedule and get CUDA_VISIBLE_DEVICES (torch still sees no GPU).
#   FTCL_SLURM_DB_PORT  (6833) MariaDB's TCP port on 127.0.0.1; slurmdbd talks to it.
#
# Partitions: `debug` (the default) and `urgent`, whose jobs preempt `debug` jobs that are in
# their way, e.g. a job asking for all $FTCL_SLURM_CPUS CPUs.
#
# Facts measured here (Slurm 22.05.8, submitit 1.5.4) that shaped this configuration:
# - submitit reads job state only from `sacct` (and the result pickle), so accounting through
#   slurmdbd is required; without it a job killed from outside is never seen as finished.
# - `scontrol requeue <id>` on a running batch job keeps the job id.  The running attempt gets
#   SIGCONT and SIGTERM (submitit's handlers ignore both: "Bypassing signal SIGTERM"), then
#   SIGKILL after KillWait; checkpoint() is NOT called, so a job that wants to resume must have
#   saved its progress itself.  The job stays COMPLETING for about KillWait + 2 s, then PENDING
#   (Reason=BeginTime) until now + cred_expire + 1 s; with the default cred_expire of 120 s a
#   requeued job idles for two minutes, hence AuthInfo below.  Only a periodic scheduler pass
#   starts it once the begin time passes, hence the short sched_interval.  Requeue to restart
#   took 12 to 15 s here.  The new attempt has SLURM_RESTART_COUNT=1, loads the submitted pickle
#   again (or the checkpoint pickle, had submitit written one) and appends to the same log.
# - `sacct -j <id>` shows only the newest attempt: REQUEUED while the old one ends, then
#   PENDING, RUNNING, COMPLETED.  submitit counts REQUEUED and PENDING as unfinished, so
#   job.result() keeps waiting and returns the second attempt's result.  `sacct -D` lists every
#   attempt (REQUEUED, ..., COMPLETED).  JobRequeue=1 is Slurm's default and submitit does not
#   pass --no-requeue, so its jobs are requeueable.
# - submitit's own flow: USR2 -> checkpoint() pickles the callable's state -> `scontrol
#   requeue` of itself from inside the job -> the requeue path above, resuming from the pickle.
#   USR2 comes from sbatch --signal=USR2@signal_delay_s (default 90 s before the time limit),
#   from preemption (below), or from job._interrupt() in tests.
# - The time-limit signal is sent by a controller check that runs every 30 s, up to one
#   period early: a job is signalled once now + signal_delay_s + 30 s >= its end time.  With submitit's 90 s
#   and timeout_min=2 that is true from the start, so every job got USR2 within 30 s of
#   starting: a Checkpointable requeued itself again and again, a plain function failed
#   ("timed-out and not checkpointable"), or died of signal 12 when USR2 came before submitit
#   set its handler.  Use timeout_min >= 5 in tests (or a small slurm_signal_delay_s).
#   With timeout_min <= 10 submitit also judges every USR2 a time-out, not a preemption (its
#   "guaranteed walltime" is negative), so each requeue uses up one of max_num_timeout.
# - Preemption (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, GraceTime=10 on
#   `debug`): with preempt_send_user_signal the preempted job gets SIGCONT + USR2 at once,
#   submitit checkpoints and requeues it within the grace time (sacct: REQUEUED), and the
#   preempting job starts about 1 s later.  Without that parameter the job would only get
#   SIGTERM, which submitit ignores, and be killed after GraceTime without a checkpoint
#   (sacct: PREEMPTED).  GraceTime=0 is worse: the immediate SIGTERM also killed submitit's
#   own `scontrol requeue` call, so the job was recorded as failed.
# - MinJobAge only controls how long squeue/scontrol still show a finished job; sacct reads
#   the database, which slurmctld updates as soon as a job changes state.
set -euo pipefail

ROOT=${FTCL_SLURM_ROOT:-/tmp/ftcl-slurm}
CPUS=${FTCL_SLURM_CPUS:-8}
GPUS=${FTCL_SLURM_GPUS:-2}
DB_PORT=${FTCL_SLURM_DB_PORT:-6833}
CLUSTER=ftcl
NODE=$(hostname -s)
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

ETC=$ROOT/etc
RUN=$ROOT/run
LOG=$ROOT/log
DB_DIR=$ROOT/mysql        # owned by mysql: data, socket, PID file, error log
MUNGE_DIR=$ROOT/munge     # owned by munge: PID file and log
DB_SOCKET=$DB_DIR/mysqld.sock
export SLURM_CONF=$ETC/slurm.conf   # every Slurm command below, daemons included, reads this

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# PID files of the daemons this script starts, and the program each PID must belong to
# (checked before any signal, so a recycled PID is never killed).
declare -A PIDFILE=(
  [munged]=$MUNGE_DIR/munged.pid
  [mariadbd]=$DB_DIR/mariadbd.pid
  [slurmdbd]=$RUN/slurmdbd.pid
  [slurmctld]=$RUN/slurmctld.pid
  [slurmd]=$RUN/slurmd.pid
)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop goes backwards

# Prints the PID of daemon $1 if its PID file names a live process running that program.
daemon_pid() {
  local name=$1 file=${PIDFILE[$1]} pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
  echo "$pid"
}

# TERM, wait up to $2 seconds, then KILL: only the PID recorded in the daemon's PID file.
stop_daemon() {
  local name=$1 wait_s=${2:-15} pid i
  if pid=$(daemon_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 5; i++)); do
      [[ -d /proc/$pid ]] || break
      sleep 0.2
    done
    if [[ -d /proc/$pid ]]; then
      log "$name ($pid) ignored SIGTERM for ${wait_s} s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 25; i++)); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "${PIDFILE[$name]}"
}

# Polls command "$@" every 0.25 s for up to $1 seconds.
wait_for() {
  local timeout_s=$1 i
  shift
  for ((i = 0; i < timeout_s * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  return 1
}

# True when something already listens on 127.0.0.1:$1 (bash's /dev/tcp, no extra tools).
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Writes stdin to file $1 (mode $2) only when the content differs; returns 0 when it changed.
write_if_changed() {
  local file=$1 mode=$2 tmp
  tmp=$(mktemp "$file.XXXXXX")   # mode 600 until complete: slurmdbd.conf holds a password
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
    rm -f "$tmp"
    chmod "$mode" "$file"
    return 1
  fi
  mv -f "$tmp" "$file"
}

install_packages() {
  local installed
  installed=$(dpkg-query -W -f='${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null | grep -c '^installed$' || true)
  if ((installed == ${#PACKAGES[@]})); then return 0; fi
  log "installing ${PACKAGES[*]}"
  # Without systemd, the packages' maintainer scripts would try to start their own daemons
  # (e.g. MariaDB on /var/lib/mysql); a policy-rc.d that answers 101 forbids that.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  local rc=0
  {
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
  } >"$LOG/apt.log" 2>&1 || rc=$?
  if ((added_policy)); then rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get install failed; see $LOG/apt.log"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then
    daemon_pid munged >/dev/null || log "using a munged this script did not start"
    return 0
  fi
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  # munged refuses a key or directories that others can read or write.
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge
  runuser -u munge -- /usr/sbin/munged --pid-file="${PIDFILE[munged]}" \
    --log-file="$MUNGE_DIR/munged.log" 9>&- # forks; the PID file names the daemon
  wait_for 10 munge_ok || die "munged does not answer; see $MUNGE_DIR/munged.log"
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "$1"; }

start_mariadb() {
  # A private instance (own data folder, socket and port) so that a system MariaDB, if any,
  # is neither needed nor touched.  --no-defaults: Debian's my.cnf points elsewhere.
  if ! daemon_pid mariadbd >/dev/null; then
    port_in_use "$DB_PORT" && die "port $DB_PORT is taken; set FTCL_SLURM_DB_PORT"
    if [[ ! -d $DB_DIR/data/mysql ]]; then
      mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR/data" \
        --auth-root-authentication-method=socket --skip-test-db >"$DB_DIR/install.log" 2>&1 ||
        die "mariadb-install-db failed; see $DB_DIR/install.log"
    fi
    # mariadbd does not daemonize: detach it from this shell; it writes its own PID file.
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR/data" \
      --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --pid-file="${PIDFILE[mariadbd]}" --log-error="$DB_DIR/mariadbd.log" \
      </dev/null >/dev/null 2>&1 9>&- &
    wait_for 60 mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping ||
      die "MariaDB does not answer; see $DB_DIR/mariadbd.log"
  fi
  # slurmdbd connects over TCP; with --skip-name-resolve its host is literally 127.0.0.1.
  db_sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

write_configs() {
  local mem_mb gres_node="" gres_types="" i changed=0
  # Leave 1 GiB to the system; memory is checked against requests but not consumed (CR_Core).
  mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024))
  if ((GPUS > 0)); then
    install -d -m 755 "$ROOT/fakegpu"
    for ((i = 0; i < GPUS; i++)); do
      # slurmd only accepts device files for GPUs; 1:3 is /dev/null's major:minor.
      [[ -c $ROOT/fakegpu/nvidia$i ]] || mknod -m 666 "$ROOT/fakegpu/nvidia$i" c 1 3
    done
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:$GPUS"
  fi
  write_if_changed "$ETC/gres.conf" 644 <<EOF && changed=1
# Written by tests/slurm/cluster.sh: fake GPUs backed by /dev/null-like char devices.
$( ((GPUS > 0)) && echo "NodeName=$NODE Name=gpu File=$ROOT/fakegpu/nvidia[0-$((GPUS - 1))] AutoDetect=off")
EOF
  write_if_changed "$SLURM_CONF" 644 <<EOF && changed=1
# Written by tests/slurm/cluster.sh (see the notes there); edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after cred_expire + 1 s (default 120 s, minimum 5).
AuthInfo=cred_expire=5
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups in containers and without systemd: track processes by parent PID, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Frequent full scheduling passes: a requeued job waits for one once its begin time passes.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
# Short waits so that cancel, requeue and preemption finish in seconds.
KillWait=2
MinJobAge=30
JobRequeue=1
# Jobs of a higher PriorityTier partition requeue the jobs in their way, and the preempted job
# first gets its sbatch --signal (USR2 for submitit) so that it can checkpoint.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# No mail on this machine; the default mail program's absence is otherwise logged as an error.
MailProg=/bin/true
# Trust the node line below, not the real hardware: it oversubscribes the CPUs.
SlurmdParameters=config_overrides
$gres_types
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem_mb $gres_node State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  if ((changed)); then SLURM_CONFIG_CHANGED=1; fi
  # slurmdbd refuses a config file that others can read (it holds the database password).
  write_if_changed "$ETC/slurmdbd.conf" 600 <<EOF && DBD_CONFIG_CHANGED=1
# Written by tests/slurm/cluster.sh; edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
PidFile=${PIDFILE[slurmdbd]}
LogFile=$LOG/slurmdbd.log
EOF
  # Let plain `sinfo` & co. work without SLURM_CONF, unless a real config lives there.
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    install -d -m 755 /etc/slurm
    ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
  else
    log "/etc/slurm/slurm.conf is not ours: export SLURM_CONF=$SLURM_CONF to use this cluster"
  fi
  return 0
}

start_slurmdbd() {
  if ((DBD_CONFIG_CHANGED)); then stop_daemon slurmdbd; fi
  if ! daemon_pid slurmdbd >/dev/null; then
    port_in_use 6819 && die "port 6819 is taken by a slurmdbd this script did not start"
    /usr/sbin/slurmdbd 9>&- # forks; PID file from slurmdbd.conf
  fi
  wait_for 30 sacctmgr -n list cluster || die "slurmdbd does not answer; see $LOG/slurmdbd.log"
  # Register the cluster before slurmctld connects, so its first records are accepted.
  if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurm() {
  if ((SLURM_CONFIG_CHANGED)); then
    stop_daemon slurmd
    stop_daemon slurmctld
  fi
  if ! daemon_pid slurmctld >/dev/null; then
    port_in_use 6817 && die "port 6817 is taken by a slurmctld this script did not start"
    /usr/sbin/slurmctld 9>&- # forks; recovers jobs and the next job id from $ROOT/state
  fi
  if ! daemon_pid slurmd >/dev/null; then
    port_in_use 6818 && die "port 6818 is taken by a slurmd this script did not start"
    /usr/sbin/slurmd -N "$NODE" 9>&-
  fi
}

node_ready() { sinfo -h -n "$NODE" -o %t | grep -Eq '^(idle|mix|alloc)$'; }
# The controller has registered with slurmdbd (ControlHost set) and sacct answers.
accounting_ready() {
  [[ -n $(sacctmgr -n -P list cluster "$CLUSTER" format=controlhost) ]] && sacct -n -X >/dev/null
}

print_pids() {
  local name pid line=""
  for name in "${DAEMONS[@]}"; do
    pid=$(daemon_pid "$name") || pid="-"
    line+="$name=$pid "
  done
  echo "PIDs: ${line% }"
}

cmd_start() {
  local t0=$SECONDS
  [[ $(uname -s) == Linux ]] || die "needs Linux"
  ((EUID == 0)) || die "needs root"
  install -d -m 755 "$ROOT" "$ETC" "$RUN" "$LOG" "$ROOT/state" "$ROOT/spool"
  install_packages
  install -d -o munge -g munge -m 700 "$MUNGE_DIR"
  install -d -o mysql -g mysql -m 750 "$DB_DIR"
  if ! runuser -u munge -- test -w "$MUNGE_DIR" || ! runuser -u mysql -- test -w "$DB_DIR"; then
    die "users munge and mysql cannot reach $ROOT (a parent folder closed to them?)"
  fi
  # The database password is made once per root folder and kept beside the configs.
  if [[ ! -s $ETC/db.password ]]; then
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$ETC/db.password")
  fi
  DB_PASSWORD=$(<"$ETC/db.password")
  SLURM_CONFIG_CHANGED=0
  DBD_CONFIG_CHANGED=0
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  wait_for 60 node_ready || die "node $NODE is not idle; see $LOG/slurmctld.log and $LOG/slurmd.log"
  wait_for 60 accounting_ready || die "sacct does not work; see $LOG/slurmdbd.log"
  sinfo -o '%P %a %D %t %N %c %m %G'
  echo "slurm up in $((SECONDS - t0)) s; $(print_pids)"
  echo "SLURM_CONF=$SLURM_CONF"
}

no_jobs() { [[ -z $(squeue -h -o %A) ]]; }

cmd_stop() {
  local ids
  # Cancel jobs first: their slurmstepd processes outlive slurmd if it stops before them.
  if daemon_pid slurmctld >/dev/null; then
    ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${ids// /} ]]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086  # one argument per job id
      scancel $ids || true
      wait_for 30 no_jobs || log "jobs still listed: $(squeue -h -o %A | tr '\n' ' ')"
    fi
  fi
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[i]}"
  done
  echo "slurm stopped"
}

cmd_status() {
  local name rc=0
  for name in "${DAEMONS[@]}"; do
    daemon_pid "$name" >/dev/null || { [[ $name == munged ]] || rc=1; }
  done
  print_pids
  if ((rc == 0)) && sinfo -o '%P %a %D %t %N %c %m %G'; then
    return 0
  fi
  echo "cluster not running (root $ROOT)"
  return 1
}

# One start or stop at a time (e.g. two test sessions starting together would race for the
# ports); the lock is released when this script exits.  Daemons are started with fd 9 closed
# (`9>&-`), or they would hold the lock for as long as they run.
lock() {
  install -d -m 755 "$ROOT"
  exec 9>"$ROOT/lock"
  flock -w 300 9 || die "another cluster.sh start/stop holds $ROOT/lock"
}

case ${1:-} in
  start) lock && cmd_start ;;
  stop) lock && cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
