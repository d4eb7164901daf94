#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost, from Debian's packages, for the test suite, CI and
# anyone who wants to try the SLURM path on a laptop.  No systemd, no cgroups: every daemon (munged,
# mariadbd, slurmdbd, slurmctld, slurmd) runs in the background as root with its configuration,
# sockets, pid file, state and log under one state directory; nothing is written to /etc/slurm.
#
#   slurm/dev-cluster.sh up     [STATE_DIR]  install the packages if missing, start, wait for an idle node
#   slurm/dev-cluster.sh down   [STATE_DIR]  cancel every job, stop the daemons, remove the state (logs stay)
#   slurm/dev-cluster.sh status [STATE_DIR]  daemons, node and queue; exit 0 only when the cluster is up
#   slurm/dev-cluster.sh env    [STATE_DIR]  print `export SLURM_CONF=...`: eval "$(slurm/dev-cluster.sh env)"
#
# STATE_DIR defaults to $BSDIST_SLURM_DIR, else /tmp/bsdist-slurm.  Every client command (sbatch, srun,
# squeue, sacct, scancel, scontrol, sinfo, sacctmgr) needs SLURM_CONF=STATE_DIR/etc/slurm.conf.
# The cluster: one node (`hostname -s`, CPUs = the machine's, whatever OMP_NUM_THREADS says, RealMemory a bit below the machine's), partitions
# `gpu` (default; just a name, no GRES: --gpus fails) and `debug`, accounting on (slurmdbd + MariaDB, so
# sacct sees every job end), requeue allowed and quick (seconds).  The daemons listen on loopback only:
# on the address the hostname resolves to (127.0.0.1; 127.0.1.1 on a stock Debian laptop), slurmctld
# on port $BSDIST_SLURM_PORT (default 16817), slurmd on +1, slurmdbd on +2; MariaDB on a unix socket only.
# Needs root (Slurm and the jobs run as root).  Written against Debian 12 (Slurm 22.05, MariaDB 10.11).
#
# Environment: BSDIST_SLURM_DIR (state dir), BSDIST_SLURM_PORT (base port), BSDIST_SLURM_CPUS (CPUs the
# node offers, default the machine's; more oversubscribes the cores), BSDIST_SLURM_CRED_EXPIRE
# (seconds a requeued job waits before it runs again, default 5, at least 5), BSDIST_SLURM_CACHE
# (where a pristine MariaDB data directory is kept, default /var/cache/bsdist-slurm; empty: none).
set -euo pipefail

die() { echo "dev-cluster: error: $*" >&2; exit 1; }
say() { echo "dev-cluster: $*"; }
# the CPUs this machine gives us: nproc alone honours OMP_NUM_THREADS (with 1, a 2-task job pended forever)
real_cpus() { OMP_NUM_THREADS='' OMP_THREAD_LIMIT='' nproc; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
    exit "${1:-0}"
}

CMD=${1:-}
[[ $CMD == -h || $CMD == --help || $CMD == help ]] && usage 0
[[ $CMD =~ ^(up|down|status|env)$ ]] || die "usage: $0 up|down|status|env [STATE_DIR] (--help for more)"
(($# <= 2)) || die "usage: $0 up|down|status|env [STATE_DIR] (--help for more)"
DIR=${2:-${BSDIST_SLURM_DIR:-/tmp/bsdist-slurm}}
[[ $DIR == /* ]] || DIR=$PWD/$DIR
DIR=${DIR%/}
[[ -n $DIR && $DIR != / ]] || die "refusing to use / as the state directory"

PORT=${BSDIST_SLURM_PORT:-16817}
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1024 || PORT > 65532)); then
    die "BSDIST_SLURM_PORT must be a port number 1024..65532"
fi
# Seconds a requeued job waits before it may start again (Slurm's minimum is 5, its default 120).
CRED_EXPIRE=${BSDIST_SLURM_CRED_EXPIRE:-5}
if ! [[ $CRED_EXPIRE =~ ^[0-9]+$ ]] || ((CRED_EXPIRE < 5)); then
    die "BSDIST_SLURM_CRED_EXPIRE must be a number of seconds >= 5"
fi
CLUSTER=bsdist
PARTITION=gpu
PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
CACHE=${BSDIST_SLURM_CACHE-/var/cache/bsdist-slurm}   # a pristine MariaDB data directory
MARKER=$DIR/.bsdist-dev-cluster   # only a directory holding this file is ever removed

ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log SPOOL=$DIR/spool DB=$DIR/mariadb
CONF=$ETC/slurm.conf
MUNGE_SOCK=$RUN/munge/munge.socket.2
DB_SOCK=$RUN/mariadb.sock
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)   # stop order; started in reverse

pidfile() { echo "$RUN/$1.pid"; }

# alive PID: the process exists and is not a zombie (an init that reaps slowly leaves those for a while).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# The pid of daemon $1 when it is running, else nothing (and status 1).  The process's name is
# checked, so that a stale pid file never points at another program.
daemon_pid() {
    local f pid comm
    f=$(pidfile "$1")
    [[ -r $f ]] || return 1
    read -r pid <"$f" 2>/dev/null || return 1
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    read -r comm <"/proc/$pid/comm" 2>/dev/null || return 1
    case $1:$comm in
        mariadb:mariadbd | mariadb:mysqld | "$1:$1") echo "$pid" ;;
        *) return 1 ;;
    esac
}

running() { daemon_pid "$1" >/dev/null; }

slurm_env() { export SLURM_CONF=$CONF; }

node_state() { slurm_env; timeout 5 sinfo -h -N -o %t 2>/dev/null | head -n1; }

# Up: every daemon runs and the node responds (sinfo's "*" suffix: not responding) and takes jobs.
all_up() {
    local d
    for d in "${DAEMONS[@]}"; do running "$d" || return 1; done
    [[ $(node_state) =~ ^(idle|mix|alloc|comp)$ ]]
}

now() { date +%s.%N; }
PHASES=() PHASE_T=
join_phases() {
    local out=
    for p in "${PHASES[@]}"; do out+=${out:+, }$p; done
    echo "$out"
}
# phase NAME: record the seconds since the previous phase (or since up began) under NAME.
phase() {
    local t
    t=$(now)
    PHASES+=("$1 $(LC_ALL=C awk -v a="$PHASE_T" -v b="$t" 'BEGIN { printf "%.1fs", b - a }')")
    PHASE_T=$t
}
elapsed() { LC_ALL=C awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# wait_for SECONDS WHAT DAEMON[:DAEMON...] COMMAND...: poll COMMAND every 0.1 s while the daemons
# live; when one dies or time is up, show its log and fail.
wait_for() {
    local limit=$1 what=$2 daemons deadline d
    IFS=: read -r -a daemons <<<"$3"
    shift 3
    deadline=$(($(date +%s) + limit))
    while started "${daemons[@]}" && ! "$@" >/dev/null 2>&1; do
        if (($(date +%s) >= deadline)); then
            for d in "${daemons[@]}"; do
                [[ -s $LOG/$d.log ]] && { echo "--- last lines of $LOG/$d.log:" >&2; tail -n 15 "$LOG/$d.log" >&2; }
            done
            die "$what did not come up within ${limit}s; see the logs in $LOG"
        fi
        sleep 0.1
    done
}

# Fail early, and clearly, when another program holds one of the cluster's ports.
check_ports() {
    local port
    for port in "$PORT" $((PORT + 1)) $((PORT + 2)); do
        if port_open "$ADDR" "$port"; then
            die "port $port on $ADDR is in use (another cluster?); set BSDIST_SLURM_PORT to another base port (uses it, +1 and +2)"
        fi
    done
}

check_socket_path() {
    # A unix socket path holds at most 107 bytes.
    ((${#1} <= 100)) || die "state directory too long for a unix socket path ($1); use a shorter STATE_DIR"
}

# ---------------------------------------------------------------------------------------------- install

missing_packages() {
    local p status
    for p in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || echo "$p"
    done
}

apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }

install_packages() {
    local missing
    command -v dpkg-query >/dev/null || die "dpkg-query not found: this script needs Debian/Ubuntu packages (${PACKAGES[*]})"
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
    ((EUID == 0)) || die "missing packages (${missing[*]}); run as root to install them with apt-get"
    say "installing ${missing[*]} (apt-get) ..."
    local t0 policy_added=0 log=/tmp/bsdist-dev-cluster-apt.log
    t0=$(now)
    # The packages' own services (munge, mariadb on 3306, ...) are not wanted: keep them from starting.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    if ! apt_install "${missing[@]}" >"$log" 2>&1; then
        # No or a stale package index: update it once and try again.
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt_install "${missing[@]}"; } >>"$log" 2>&1; then
            tail -n 20 "$log" >&2
            die "apt-get install ${missing[*]} failed; see $log"
        fi
    fi
    if ((policy_added)); then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    say "installed ${missing[*]} in $(elapsed "$t0")s"
}

# ---------------------------------------------------------------------------------------------- config

ADDR=127.0.0.1   # the address the daemons listen on (write_configs may change it)

write_configs() {
    local host addr comm cpus mem_kib mem_mib real_mib
    host=$(hostname -s)
    # Listen on loopback only: with NoInAddrAny the daemons (slurmd, slurmdbd, srun, slurmstepd) bind
    # the address the hostname resolves to (127.0.0.1 here and in CI, 127.0.1.1 on a stock Debian laptop).
    addr=$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR == 1 { print $1 }')
    if [[ $addr == 127.* ]]; then
        comm=NoCtldInAddrAny,NoInAddrAny
    else
        say "warning: hostname $host resolves to ${addr:-nothing}, not a loopback address: slurmd and slurmdbd listen on all interfaces"
        addr=127.0.0.1 comm=
    fi
    ADDR=$addr
    cpus=${BSDIST_SLURM_CPUS:-$(real_cpus)}
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "BSDIST_SLURM_CPUS must be a positive number"
    mem_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
    mem_mib=$((mem_kib / 1024))
    # A bit below the real memory (slurmd drains a node that reports less than RealMemory).
    real_mib=$((mem_mib * 95 / 100))
    ((mem_mib - real_mib < 256 && mem_mib > 512)) && real_mib=$((mem_mib - 256))

    cat >"$CONF" <<EOF
# Written by slurm/dev-cluster.sh: a single-node development cluster.  Clients need SLURM_CONF=$CONF
ClusterName=$CLUSTER
SlurmctldHost=$host($addr)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A short credential lifetime: a requeued job waits cred_expire seconds before it may start again.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
${comm:+CommunicationParameters=$comm}
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No systemd, no cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
# Scheduling: every CPU is a slot, memory is not a consumable (a job without --mem must not take it all).
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# Jobs leave quickly.
MinJobAge=10
KillWait=5
CompleteWait=0
InactiveLimit=0
Waittime=0
UnkillableStepTimeout=30
# Accounting (sacct) through slurmdbd: submitit polls sacct to see a job end.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$addr
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
$( ((cpus > $(real_cpus))) && echo "SlurmdParameters=config_overrides   # more CPUs than the machine has (BSDIST_SLURM_CPUS)")
NodeName=$host NodeAddr=$addr CPUs=$cpus RealMemory=$real_mib State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=debug Nodes=$host Default=NO MaxTime=INFINITE State=UP
EOF

    (
        umask 077
        cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/dev-cluster.sh
DbdHost=$host
DbdAddr=$addr
${comm:+CommunicationParameters=NoInAddrAny}
DbdPort=$((PORT + 2))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
PidFile=$(pidfile slurmdbd)
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=bsdist-dev
EOF
    )
    chmod 600 "$ETC/slurmdbd.conf"
}

# ---------------------------------------------------------------------------------------------- start

start_munged() {
    (
        umask 077
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$ETC/munge.key" 2>/dev/null
        else
            dd if=/dev/urandom of="$ETC/munge.key" bs=1024 count=1 status=none
        fi
    )
    chmod 600 "$ETC/munge.key"
    launch munged munged --foreground --force --key-file="$ETC/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$(pidfile munged)" --log-file="$LOG/munged.log" --seed-file="$DIR/munge/munged.seed"
}

munge_ok() { munge -n --socket="$MUNGE_SOCK" </dev/null | unmunge --socket="$MUNGE_SOCK" >/dev/null; }

start_mariadb() {
    local opts=(--no-defaults --user=root --datadir="$DB" --socket="$DB_SOCK" --pid-file="$(pidfile mariadb)"
        --skip-networking --skip-name-resolve --log-error="$LOG/mariadb.log"
        --innodb-buffer-pool-size=128M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900
        --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --skip-log-bin)
    # mariadb-install-db takes seconds on a busy machine: its output is kept (per MariaDB version) and
    # copied from then on.  BSDIST_SLURM_CACHE= (empty) turns that off.
    local template tmp install_db mariadbd
    install_db=$(command -v mariadb-install-db || command -v mysql_install_db) || die "mariadb-install-db not found"
    mariadbd=$(command -v mariadbd || command -v mysqld) || die "mariadbd not found"
    if [[ -z $CACHE ]]; then
        "$install_db" --no-defaults --user=root --datadir="$DB" --skip-test-db --skip-name-resolve \
            --auth-root-authentication-method=socket --innodb-log-file-size=16M >"$LOG/mariadb-install-db.log" 2>&1 ||
            die "mariadb-install-db failed; see $LOG/mariadb-install-db.log"
        launch mariadb "$mariadbd" "${opts[@]}"
        return
    fi
    template=$CACHE/mariadb-$("$mariadbd" --version | md5sum | cut -c1-12)
    if [[ ! -d $template ]]; then
        mkdir -p "$CACHE"
        tmp=$(mktemp -d "$template.XXXXXX")
        "$install_db" --no-defaults --user=root --datadir="$tmp" --skip-test-db --skip-name-resolve \
            --auth-root-authentication-method=socket --innodb-log-file-size=16M >"$LOG/mariadb-install-db.log" 2>&1 ||
            { rm -rf "$tmp"; die "mariadb-install-db failed; see $LOG/mariadb-install-db.log"; }
        mv -T "$tmp" "$template" 2>/dev/null || rm -rf "$tmp"
    fi
    rmdir "$DB"
    cp -a "$template" "$DB"
    launch mariadb "$mariadbd" "${opts[@]}"
}

sql() { "$(command -v mariadb || echo mysql)" --no-defaults --socket="$DB_SOCK" --user=root --batch --skip-column-names "$@"; }

create_database() {
    sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'bsdist-dev';
        GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

port_open() { (: <"/dev/tcp/$1/$2") 2>/dev/null; }

# (Slurm's clients retry a closed port for seconds: probe it first.)
slurmdbd_ok() { port_open "$ADDR" $((PORT + 2)) && slurm_env && timeout 5 sacctmgr -n -P show cluster format=cluster; }

cluster_registered() { slurm_env; sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

idle() { port_open "$ADDR" "$PORT" && [[ $(node_state) == idle ]]; }

# launch NAME COMMAND...: start a daemon in the foreground of its own session, in the background of
# this script, its output in LOG/NAME.out; its pid goes to its pid file at once (the daemons write the
# same pid there themselves).
launch() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    echo "$!" >"$(pidfile "$name")"
}

# Fail at once when a daemon just launched has died.
started() {
    local d pid log
    for d in "$@"; do
        read -r pid <"$(pidfile "$d")" 2>/dev/null || pid=
        [[ -n $pid ]] && alive "$pid" && continue
        for log in "$LOG/$d.out" "$LOG/$d.log"; do
            [[ -s $log ]] && { echo "--- last lines of $log:" >&2; tail -n 15 "$log" >&2; }
        done
        die "$d exited while starting; see $LOG/$d.log and $LOG/$d.out"
    done
}

# Called when up fails: stop what it started (the logs stay).
up_failed() {
    local rc=$?
    ((rc == 0)) && return 0
    trap - EXIT
    say "up failed: stopping what it started; logs in $LOG"
    down_quiet >/dev/null 2>&1 || true
    say "$(join_phases)"
    exit "$rc"
}

up() {
    local t0 t1
    ((EUID == 0)) || die "needs root (the daemons and the jobs run as root); try: sudo $0 up $DIR"
    if [[ -d $DIR ]] && all_up; then
        say "already up ($DIR); export SLURM_CONF=$CONF"
        return 0
    fi
    install_packages
    t0=$(now) PHASE_T=$t0
    if [[ -e $DIR ]]; then
        [[ -d $DIR ]] || die "$DIR exists and is not a directory"
        if [[ -e $MARKER ]]; then
            # Left over from a crash or a half-started cluster: start from scratch.
            down_quiet
        elif [[ -n $(ls -A "$DIR") ]]; then
            die "$DIR exists, is not empty and was not made by this script; choose another STATE_DIR"
        fi
    fi
    check_socket_path "$MUNGE_SOCK"
    check_socket_path "$DB_SOCK"
    # munged insists that the directories around its socket, key and log are not writable by others
    # and that every level of the socket's path is traversable.
    mkdir -p "$DIR"
    chmod 755 "$DIR"
    rm -rf "$LOG"
    mkdir -p "$ETC" "$RUN/munge" "$LOG" "$SPOOL/slurmctld" "$SPOOL/slurmd" "$DIR/munge" "$DB"
    chmod 755 "$ETC" "$RUN" "$RUN/munge" "$LOG" "$SPOOL"
    chmod 700 "$DIR/munge"
    local p=$DIR
    while [[ $p != / ]]; do
        p=$(dirname "$p")
        [[ $(stat -c %A "$p") == d????????[xt] ]] || die "munged needs $p to be traversable by all (chmod o+x $p)"
    done
    touch "$MARKER"
    write_configs
    check_ports
    PHASES=() PHASE_T=$(now)
    trap up_failed EXIT

    start_munged
    start_mariadb
    wait_for 10 munged munged munge_ok
    wait_for 60 mariadb mariadb sql -e 'SELECT 1'
    create_database
    phase mariadb

    slurm_env
    # The mysql plugin gives libmariadb no socket path, so it takes MYSQL_UNIX_PORT.
    MYSQL_UNIX_PORT=$DB_SOCK launch slurmdbd slurmdbd -D
    wait_for 60 slurmdbd slurmdbd slurmdbd_ok
    phase slurmdbd

    launch slurmctld slurmctld -D -f "$CONF"
    # slurmd registers at once and retries only a second later: start it once slurmctld listens.
    wait_for 60 slurmctld slurmctld port_open "$ADDR" "$PORT"
    launch slurmd slurmd -D -f "$CONF"
    wait_for 60 "the node (idle in sinfo)" slurmctld:slurmd idle
    # slurmctld registers the cluster in the accounting database itself (Slurm >= 22.05); without the
    # cluster, sacct shows nothing.  Older versions need sacctmgr.
    local i
    for ((i = 0; i < 100; i++)); do
        cluster_registered && break
        sleep 0.1
    done
    if ! cluster_registered; then
        sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 ||
            die "sacctmgr add cluster $CLUSTER failed; see $LOG/sacctmgr.log and $LOG/slurmdbd.log"
    fi
    phase "slurmctld+slurmd"
    trap - EXIT
    t1=$(elapsed "$t0")
    say "up in ${t1}s ($(join_phases)): node $(hostname -s) idle, partitions $PARTITION (default) and debug; logs in $LOG"
    say "export SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------------------------------------- stop

# stop DAEMON: SIGTERM, wait up to 15 s, then SIGKILL.
stop() {
    local pid i
    pid=$(daemon_pid "$1") || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 300; i++)); do
        alive "$pid" || return 0
        sleep 0.05
    done
    say "$1 (pid $pid) ignored SIGTERM for 15s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

# Step daemons (slurmstepd) and job processes of this cluster that outlived slurmd: found by the
# SLURM_CONF in their environment, never by name alone.
leftover_pids() {
    local env pid
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        if { tr '\0' '\n' <"$env"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */slurmstepd* ]] && echo "$pid"
        fi
    done
}

drain_jobs() {
    local i ids
    slurm_env
    running slurmctld || return 0
    mapfile -t ids < <(timeout 5 squeue -h -o %A 2>/dev/null)
    ((${#ids[@]})) || return 0
    # Every job of every user (by id: scancel wants a filter); --full signals the batch shell too.
    timeout 10 scancel --quiet --full "${ids[@]}" >/dev/null 2>&1 || true
    running slurmd || return 0 # without slurmd nothing ends: the daemons go, their leftovers are killed
    for ((i = 0; i < 150; i++)); do
        [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && return 0
        sleep 0.1
    done
    say "jobs still listed 15s after scancel: $(squeue -h -o '%i %T' 2>/dev/null | tr '\n' ' ')"
}

down_quiet() {
    local d pids
    drain_jobs
    phase jobs
    for d in "${DAEMONS[@]}"; do
        stop "$d"
        phase "$d"
    done
    mapfile -t pids < <(leftover_pids)
    if ((${#pids[@]})); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    if [[ -e $MARKER ]]; then
        # Keep the logs (CI uploads them after a failure); everything else goes.
        find "$DIR" -mindepth 1 -maxdepth 1 ! -name log ! -name "${MARKER##*/}" -exec rm -rf {} +
    fi
}

down() {
    local t0 d was=()
    t0=$(now) PHASE_T=$t0
    if [[ ! -e $MARKER ]]; then
        say "not running (no cluster in $DIR)"
        return 0
    fi
    for d in "${DAEMONS[@]}"; do running "$d" && was+=("$d"); done
    if ((${#was[@]} == 0)) && [[ ! -e $ETC && ! -e $RUN ]]; then
        say "not running ($DIR)"
        return 0
    fi
    ((EUID == 0)) || die "needs root to stop the daemons"
    down_quiet
    say "down in $(elapsed "$t0")s ($(join_phases)); logs kept in $LOG"
}

# ---------------------------------------------------------------------------------------------- status

status() {
    local d pid ok=1
    echo "state dir: $DIR"
    for d in munged mariadb slurmdbd slurmctld slurmd; do
        if pid=$(daemon_pid "$d"); then
            printf '  %-10s running (pid %s)\n' "$d" "$pid"
        else
            printf '  %-10s stopped\n' "$d"
            ok=0
        fi
    done
    if ((ok)); then
        slurm_env
        echo "SLURM_CONF=$CONF"
        sinfo 2>&1 | sed 's/^/  /'
        squeue 2>&1 | sed 's/^/  /'
        [[ -n $(node_state) ]] || ok=0
    fi
    ((ok))
}

case $CMD in
    up) up ;;
    down) down ;;
    status) status ;;
    env)
        printf 'export SLURM_CONF=%q\n' "$CONF"
        printf 'export BSDIST_SLURM_DIR=%q\n' "$DIR"
        ;;
esac
