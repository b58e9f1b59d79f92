#!/usr/bin/env bash
# A real SLURM cluster on this one machine: slurmctld, slurmdbd (+ MariaDB, for sacct) and TWO slurmd
# daemons ("node1" on 127.0.0.11, "node2" on 127.0.0.12), all authenticated by a private munged.
# It exists so the launcher (launch/slurm.py) can be tried and tested against the real thing.
#
#   slurm/local_cluster.sh start    # install the Debian packages if missing, start what is not running
#   slurm/local_cluster.sh status   # daemons, nodes, partitions
#   slurm/local_cluster.sh stop     # cancel this cluster's jobs, stop the daemons this script started
#   eval "$(slurm/local_cluster.sh env)"   # SLURM_CONF for sbatch/squeue/sacct in your shell
#
# Needs root (daemons run as root, packages come from apt). Every file lives under one state directory
# ($ACTIONREC_SLURM_DIR, default /var/tmp/actionrec-slurm); daemons are found by the PID files there, so
# `start` is idempotent and `stop` never touches a munged/mariadbd/slurmd this script did not start.
# Partitions: "batch" (default, preemptable: PreemptMode=REQUEUE) and "urgent" (higher PriorityTier,
# preempts batch jobs). Why each setting is what it is (measured): docs/slurm.md, "Why the local cluster is
# set up the way it is".
set -euo pipefail

STATE="${ACTIONREC_SLURM_DIR:-/var/tmp/actionrec-slurm}"
CTLD_PORT="${ACTIONREC_SLURM_CTLD_PORT:-16817}"
DBD_PORT="${ACTIONREC_SLURM_DBD_PORT:-16819}"
NODES=(node1 node2)
declare -A NODE_ADDR=([node1]=127.0.0.11 [node2]=127.0.0.12)
declare -A NODE_PORT=([node1]=17001 [node2]=17002)
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

CONF="$STATE/etc/slurm.conf"
DBD_CONF="$STATE/etc/slurmdbd.conf"
MUNGE_SOCKET="$STATE/munge/munge.socket"
MYSQL_SOCKET="$STATE/mysql/mysqld.sock"
HOST="$(hostname -s)"

die() { echo "local_cluster: error: $*" >&2; exit 1; }
say() { echo "local_cluster: $*"; }

need_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (the SLURM daemons run as root here); try: sudo $0 $*"
}

# --- daemons tracked by PID file ------------------------------------------------------------------
# $STATE/run/NAME.pid holds "PID PROGRAM"; alive NAME: that process exists and still is that program
# (guards against PID reuse)
alive() {
    local pidfile="$STATE/run/$1.pid" pid prog
    [[ -s "$pidfile" ]] || return 1
    read -r pid prog <"$pidfile" || return 1
    [[ -n "$pid" && -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$prog" ]]
}
pid_of() { read -r pid _ <"$STATE/run/$1.pid" && echo "$pid"; }

# launch NAME CMD...: start a foreground daemon in its own session, detached from this shell, and record
# its PID ourselves (the daemons' own PID files are written late or not at all in foreground mode)
launch() {
    local name="$1"; shift
    setsid nohup "$@" >>"$STATE/log/$name.out" 2>&1 </dev/null &
    echo "$! $(basename "$1")" >"$STATE/run/$name.pid"
    local i
    for i in $(seq 20); do alive "$name" && return 0; sleep 0.1; done  # until the exec has happened
    die "$name did not start; see $STATE/log/$name.out"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local limit="$1" what="$2"; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not come up within ${limit}s; see logs in $STATE/log/"
        sleep 0.2
    done
}

gone() {  # gone PID: exited (a zombie nobody reaps counts as exited)
    [[ ! -r "/proc/$1/stat" ]] || [[ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" == Z ]]
}

terminate() {  # terminate NAME...: SIGTERM all at once, wait, SIGKILL stragglers; only our PID files
    local name pid i pids=() names=()
    for name in "$@"; do
        if alive "$name"; then
            pid="$(pid_of "$name")"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$name")
        fi
        rm -f "$STATE/run/$name.pid"
    done
    for i in "${!pids[@]}"; do
        for _ in $(seq 100); do gone "${pids[$i]}" && break; sleep 0.1; done
        gone "${pids[$i]}" || kill -KILL "${pids[$i]}" 2>/dev/null || true
        say "stopped ${names[$i]} (pid ${pids[$i]})"
    done
}

# --- set-up --------------------------------------------------------------------------------------
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing Debian packages (${missing[*]}) and no apt-get to install them"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # Installing must not start the packages' own system services (munge, mariadb, slurm*): this script
    # runs private instances and leaves everything else alone. policy-rc.d is Debian's switch for that.
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # the package lists may be stale or absent on a fresh machine: refresh once if the install fails
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
    if [[ "$(trap -p EXIT)" == *policy-rc.d* ]]; then rm -f "$policy"; trap - EXIT; fi
}

add_hosts_entries() {
    # MASTER_ADDR is the job's first node name: it must resolve without DNS
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^[[:space:]]*${NODE_ADDR[$n]//./\\.}[[:space:]]+$n([[:space:]]|\$)" /etc/hosts \
            || echo "${NODE_ADDR[$n]} $n  # actionrec local SLURM cluster" >>/etc/hosts
    done
}

write_configs() {
    mkdir -p "$STATE"/{etc,run,log,munge,mysql,spool/ctld}
    # munged insists every directory above its socket is searchable by all
    chmod 755 "$STATE" "$STATE/munge"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
    if [[ ! -s "$STATE/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key"
    fi
    {
        cat <<EOF
# Written by slurm/local_cluster.sh (rewritten on every start). Two virtual nodes on loopback.
ClusterName=actionrec
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# short credential lifetime: a requeued job may start again after 10-18 s instead of 120 s
AuthInfo=cred_expire=10,socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.daemon.pid
SlurmdPidFile=$STATE/run/slurmd-%n.daemon.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections this names the munge socket (AuthInfo's socket= is not used there)
AccountingStoragePass=$MUNGE_SOCKET
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=3,bf_interval=3
# 22.05 spelling; sends the job's --signal (submitit: USR2) when it is preempted
SlurmctldParameters=preempt_send_user_signal
# lets two virtual nodes claim the CPUs written below whatever this machine has
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
        for n in "${NODES[@]}"; do
            echo "NodeName=$n NodeHostname=$HOST NodeAddr=${NODE_ADDR[$n]} Port=${NODE_PORT[$n]} CPUs=2 RealMemory=4000 State=UNKNOWN"
        done
        local nodelist; nodelist="$(IFS=,; echo "${NODES[*]}")"
        echo "PartitionName=batch Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30"
        echo "PartitionName=urgent Nodes=$nodelist MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
    } >"$CONF"
    cat >"$DBD_CONF" <<EOF
# Written by slurm/local_cluster.sh. Accounting, so that sacct (which submitit polls) knows every job.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.daemon.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=actionrec_slurm_acct
EOF
    chmod 600 "$DBD_CONF"
    # Clients without SLURM_CONF read /etc/slurm/slurm.conf (or try DNS for a config server): point it
    # here, unless it is somebody else's configuration.
    mkdir -p /etc/slurm
    if [[ ! -e /etc/slurm/slurm.conf || "$(readlink /etc/slurm/slurm.conf)" == "$CONF" ]]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    else
        say "note: /etc/slurm/slurm.conf belongs to another setup; use: export SLURM_CONF=$CONF"
    fi
}

mysql_ready() { mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" -uroot ping; }
dbd_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$DBD_PORT") 2>/dev/null; }
ctld_ready() { SLURM_CONF="$CONF" scontrol ping | grep -q UP; }
nodes_idle() {
    local states
    states="$(SLURM_CONF="$CONF" sinfo -h -N -p batch -o '%N %T')" || return 1
    [[ "$(grep -Ec ' (idle|mixed|allocated)' <<<"$states")" == "${#NODES[@]}" ]]
}

start() {
    need_root start
    install_packages
    add_hosts_entries
    write_configs

    if ! alive munged; then
        rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
        launch munged munged --foreground --force --key-file="$STATE/munge/munge.key" \
            --socket="$MUNGE_SOCKET" --pid-file="$STATE/munge/munged.pid" \
            --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
        wait_for 10 munged munge --socket="$MUNGE_SOCKET" -n
    fi
    if ! alive mariadbd; then
        if [[ ! -d "$STATE/mysql/data/mysql" ]]; then
            mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql/data" \
                --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
                || die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
        fi
        launch mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/mysql/data" \
            --socket="$MYSQL_SOCKET" --pid-file="$STATE/mysql/mariadbd.pid" --skip-networking \
            --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=16M --innodb-lock-wait-timeout=900 --skip-log-bin
        wait_for 30 MariaDB mysql_ready
    fi
    if ! alive slurmdbd; then
        # slurmdbd's MySQL client finds the private socket through this variable
        # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF
        SLURM_CONF="$CONF" MYSQL_UNIX_PORT="$MYSQL_SOCKET" launch slurmdbd slurmdbd -D
        wait_for 30 slurmdbd dbd_ready
    fi
    if ! alive slurmctld; then
        SLURM_CONF="$CONF" launch slurmctld slurmctld -D -f "$CONF"
        wait_for 30 slurmctld ctld_ready
    fi
    local n
    for n in "${NODES[@]}"; do
        alive "slurmd-$n" || SLURM_CONF="$CONF" launch "slurmd-$n" slurmd -D -N "$n" -f "$CONF"
    done
    wait_for 60 "nodes ${NODES[*]}" nodes_idle
    say "cluster up: $(SLURM_CONF="$CONF" sinfo -h -o '%P %D %T' | tr '\n' ' ')"
    say "clients: export SLURM_CONF=$CONF"
}

stop() {
    need_root stop
    if alive slurmctld; then
        # jobs left behind would start again on the next start; slurmstepd would outlive slurmd
        SLURM_CONF="$CONF" scancel --full --quiet --state=PENDING,RUNNING,SUSPENDED,REQUEUED 2>/dev/null || true
        local i
        for i in $(seq 50); do
            [[ -z "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
    local n slurmds=()
    for n in "${NODES[@]}"; do slurmds+=("slurmd-$n"); done
    terminate "${slurmds[@]}" slurmctld
    terminate slurmdbd  # after slurmctld, which reports its shutdown to it
    terminate mariadbd munged
    if [[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" == "$CONF" ]]; then rm -f /etc/slurm/slurm.conf; fi
    say "stopped (state kept in $STATE)"
}

status() {
    local name running=0
    for name in munged mariadbd slurmdbd slurmctld slurmd-node1 slurmd-node2; do
        if alive "$name"; then
            printf '%-14s running (pid %s)\n' "$name" "$(pid_of "$name")"
            running=$((running + 1))
        else
            printf '%-14s stopped\n' "$name"
        fi
    done
    if alive slurmctld; then SLURM_CONF="$CONF" sinfo; fi
    ((running == 6))
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    -h | --help | help)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    *) die "unknown command '${1:-}'; use one of: start, stop, status, env (or --help)" ;;
esac
