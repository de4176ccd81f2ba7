#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster (Debian 12, slurm-wlm 22.05) on
# localhost without systemd: munged + slurmctld + slurmd run as background
# processes, PIDs are written to $SLURM_STATE/pids/, config/logs/spool live
# under $SLURM_STATE.  Stop it with stop-slurm.sh (same SLURM_STATE).
#
# Env knobs:
#   SLURM_STATE       state dir (default /tmp/slurm/state)
#   SLURM_SKIP_INSTALL=1   do not run apt-get (packages must be present)
#   SLURM_WAIT_S      seconds to wait for the node to become idle (default 60)
#   SLURMCTLD_PORT / SLURMD_PORT  (defaults 6817 / 6818)
#   SLURM_ACCOUNTING=1   also install+start MariaDB and slurmdbd so that sacct
#                        works (submitit polls sacct for job states)
#   SLURMDBD_PORT / SLURM_MYSQL_PORT (defaults 6819 / 3307, 127.0.0.1 only)
#   SLURM_CRED_EXPIRE    AuthInfo cred_expire (default 10 s; a requeued job is
#                        held cred_expire+1 s before it may start again;
#                        slurm's default is 120, minimum 5)
#
# After it returns, client commands (sbatch, squeue, scancel, scontrol, submitit)
# find the config through /etc/slurm/slurm.conf (a symlink made here, removed by
# stop-slurm.sh) or through SLURM_CONF=$SLURM_STATE/slurm.conf.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

STATE=${SLURM_STATE:-/tmp/slurm/state}
WAIT_S=${SLURM_WAIT_S:-60}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
DBD_PORT=${SLURMDBD_PORT:-6819}
MYSQL_PORT=${SLURM_MYSQL_PORT:-3307}
ACCT=${SLURM_ACCOUNTING:-0}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
NODE=$(hostname -s)

t0=$(date +%s.%N)
log() { printf '[start-slurm %6.1fs] %s\n' "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*"; }

# ---------------------------------------------------------------- install
if [[ "${SLURM_SKIP_INSTALL:-0}" != 1 ]]; then
  need=()
  pkgs=(slurmctld slurmd slurm-client munge)
  [[ "$ACCT" == 1 ]] && pkgs+=(slurmdbd mariadb-server)
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    # policy-rc.d (exit 101) keeps the postinst scripts from starting services;
    # install one only for the duration of the install if none exists.
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
    fi
    # A fresh machine has no package lists yet: update once and retry when the first try fails.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${need[@]}" >"/tmp/slurm-apt-install.log" 2>&1 \
      || { apt-get update -q >>"/tmp/slurm-apt-install.log" 2>&1; \
           DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
             "${need[@]}" >>"/tmp/slurm-apt-install.log" 2>&1; } \
      || { tail -30 /tmp/slurm-apt-install.log; ((made_policy)) && rm -f /usr/sbin/policy-rc.d; exit 1; }
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    log "install done"
  else
    log "packages already installed"
  fi
fi

# refuse to start twice
if [[ -d "$STATE/pids" ]]; then
  for f in "$STATE"/pids/*.pid; do
    [[ -e "$f" ]] || continue
    if kill -0 "$(cat "$f")" 2>/dev/null; then
      echo "start-slurm: $f is alive; run stop-slurm.sh first" >&2; exit 1
    fi
  done
fi
ports=("$CTLD_PORT" "$SLURMD_PORT"); [[ "$ACCT" == 1 ]] && ports+=("$DBD_PORT" "$MYSQL_PORT")
for port in "${ports[@]}"; do
  if ss -Hltn "sport = :$port" | grep -q .; then
    echo "start-slurm: port $port already in use" >&2; exit 1
  fi
done

rm -rf "$STATE"
mkdir -p "$STATE"/{pids,log,ctld,spool,munge}
chmod 755 "$STATE" "$STATE"/spool

# ---------------------------------------------------------------- munge
# slurm 22.05 has no munge-less auth (auth/none was removed, auth/slurm
# arrived in 23.11), so munged is required.  Run it as user munge, in the
# foreground (-F) in the background of this shell, with a private key,
# socket, log and pid file under $STATE so nothing system-wide is touched.
MUNGE_SOCK=$STATE/munge/munge.socket.2
chown munge:munge "$STATE/munge"; chmod 700 "$STATE/munge"
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 status=none
chown munge:munge "$STATE/munge/munge.key"; chmod 400 "$STATE/munge/munge.key"
chmod 711 "$STATE/munge"   # clients must reach the socket
setpriv --reuid=munge --regid=munge --init-groups \
  /usr/sbin/munged -F --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCK" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed" \
    --pid-file="$STATE/munge/munged.pid" --num-threads=2 \
  </dev/null >>"$STATE/log/munged.out" 2>&1 &
echo $! >"$STATE/pids/munged.pid"
for _ in $(seq 100); do [[ -S "$MUNGE_SOCK" ]] && break; sleep 0.1; done
[[ -S "$MUNGE_SOCK" ]] || { echo "munged did not start"; cat "$STATE/munge/munged.log" "$STATE/log/munged.out"; exit 1; }
munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null
log "munged up (pid $(cat "$STATE/pids/munged.pid"))"

# ---------------------------------------------------------------- accounting (optional)
# sacct needs slurmdbd, and slurmdbd only stores into MySQL/MariaDB (22.05
# has no file-based accounting storage any more).
if [[ "$ACCT" == 1 ]]; then
  MYDIR=$STATE/mysql
  mkdir -p "$MYDIR"; chown mysql:mysql "$MYDIR"
  mariadb-install-db --no-defaults --user=mysql --datadir="$MYDIR/data" \
    --skip-test-db --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.out" 2>&1 \
    || { tail -20 "$STATE/log/mariadb-install.out"; exit 1; }
  mariadbd --no-defaults --user=mysql --datadir="$MYDIR/data" \
    --socket="$MYDIR/mysqld.sock" --pid-file="$MYDIR/mysqld.pid" \
    --bind-address=127.0.0.1 --port="$MYSQL_PORT" --skip-name-resolve \
    --innodb-buffer-pool-size=128M \
    --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    </dev/null >>"$STATE/log/mariadb.out" 2>&1 &
  echo $! >"$STATE/pids/mariadbd.pid"
  for _ in $(seq 150); do mariadb-admin -S "$MYDIR/mysqld.sock" ping >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb-admin -S "$MYDIR/mysqld.sock" ping >/dev/null || { echo "mariadbd not up"; tail -20 "$STATE/log/mariadb.out"; exit 1; }
  mariadb -S "$MYDIR/mysqld.sock" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  log "mariadbd up (pid $(cat "$STATE/pids/mariadbd.pid"))"

  cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/log/slurmdbd.selfpid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/slurmdbd.conf"
  # slurmdbd finds slurmdbd.conf next to $SLURM_CONF
  SLURM_CONF=$STATE/slurm.conf slurmdbd -D </dev/null >>"$STATE/log/slurmdbd.out" 2>&1 &
  echo $! >"$STATE/pids/slurmdbd.pid"
  for _ in $(seq 300); do ss -Hltn "sport = :$DBD_PORT" | grep -q . && break; sleep 0.2; done
  ss -Hltn "sport = :$DBD_PORT" | grep -q . || { echo "slurmdbd not up"; tail -20 "$STATE/log/slurmdbd.log"; exit 1; }
  log "slurmdbd up (pid $(cat "$STATE/pids/slurmdbd.pid"))"
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the slurmctld<->slurmdbd (and sacct/sacctmgr) munge socket comes from here, not AuthInfo
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT_CONF="# no slurmdbd: no accounting database, sacct will not work
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# ---------------------------------------------------------------- slurm.conf
# Hardware line exactly as slurmd sees it (CPUs, sockets, cores, RealMemory).
HW=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ *UpTime=.*//')
cat >"$STATE/slurm.conf" <<EOF
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$STATE/log/slurmctld.selfpid
SlurmdPidFile=$STATE/log/slurmd.selfpid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups / no systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
$ACCT_CONF
# completed jobs stay visible to squeue/scontrol for MinJobAge seconds
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MaxArraySize=10001
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $HW State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
export SLURM_CONF=$STATE/slurm.conf

# make the config the system default for client tools (sbatch/squeue/submitit)
mkdir -p /etc/slurm
if [[ -L /etc/slurm/slurm.conf || ! -e /etc/slurm/slurm.conf ]]; then
  ln -sfn "$STATE/slurm.conf" /etc/slurm/slurm.conf
  touch "$STATE/pids/etc-symlink"
else
  log "WARNING: /etc/slurm/slurm.conf is a real file; export SLURM_CONF=$SLURM_CONF"
fi

# ---------------------------------------------------------------- daemons
slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$STATE/log/slurmctld.out" 2>&1 &
echo $! >"$STATE/pids/slurmctld.pid"
for _ in $(seq 150); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping | grep -q 'is UP' || { echo "slurmctld not up"; tail -30 "$STATE/log/slurmctld.log"; exit 1; }
log "slurmctld up (pid $(cat "$STATE/pids/slurmctld.pid"))"

slurmd -D -f "$SLURM_CONF" -N "$NODE" </dev/null >>"$STATE/log/slurmd.out" 2>&1 &
echo $! >"$STATE/pids/slurmd.pid"

deadline=$(( $(date +%s) + WAIT_S ))
until sinfo -h -n "$NODE" -o '%T' 2>/dev/null | grep -qx 'idle'; do
  if (( $(date +%s) > deadline )); then
    echo "node $NODE not idle after ${WAIT_S}s:"; sinfo -N -l; tail -20 "$STATE/log/slurmd.log"; exit 1
  fi
  sleep 0.5
done
log "slurmd up (pid $(cat "$STATE/pids/slurmd.pid")); node $NODE idle"
sinfo
echo "export SLURM_CONF=$SLURM_CONF"
