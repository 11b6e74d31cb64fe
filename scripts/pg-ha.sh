#!/usr/bin/env bash
# A real pg_auto_failover formation on this machine, for the failover
# integration test and the benchmark: a monitor on BASEPORT and two data
# nodes, `a` on BASEPORT+1 and `b` on BASEPORT+2, all on 127.0.0.1 with
# trust auth, no SSL, database `vaultguard`, synchronous by default.
#
#   scripts/pg-ha.sh up DIR BASEPORT [--async]  # prints the multi-host URL last
#   scripts/pg-ha.sh primary DIR                # "a 55433"
#   scripts/pg-ha.sh kill-primary DIR           # SIGKILL keeper+postmaster: "a"
#   scripts/pg-ha.sh wait-primary DIR [TIMEOUT] # seconds from kill to writable
#   scripts/pg-ha.sh rejoin DIR NODE [TIMEOUT]  # seconds until secondary (+sync)
#   scripts/pg-ha.sh sync DIR on|off            # standby synchronous or not
#   scripts/pg-ha.sh down DIR                   # stop everything, remove DIR
#   scripts/pg-ha.sh check                      # are the packages installed?
#   scripts/pg-ha.sh install                    # apt-get them if not
#
# Everything lives in DIR, owned by postgres (pg_autoctl refuses to run as
# root: all goes through runuser): data dirs, logs (DIR/<node>.log), sockets
# (DIR/sock: pg_autoctl turns PG_REGRESS_SOCK_DIR into `postgres -k`), and
# pg_autoctl's config/state/pid files (XDG_* dirs), away from ~postgres,
# /var/run/postgresql and the :5432 cluster.
set -Eeuo pipefail
trap 'echo "pg-ha: failed (line $LINENO): $BASH_COMMAND" >&2' ERR

PG_MAJOR="${PG_MAJOR:-$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)}"
PGBIN="/usr/lib/postgresql/${PG_MAJOR:-none}/bin"
MONDB=pg_auto_failover

# Monitor tuning (pgautofailover.* GUCs, reloadable; defaults in brackets).
# A primary is dead once a health check failed (connect refused/timed out,
# retried) AND its keeper has not reported (every 1 s) for UNHEALTHY_TIMEOUT;
# the standby then stops replication and takes writes once the old primary
# had PRIMARY_DEMOTE_TIMEOUT to demote itself. Upstream's 30 s outlasts the
# keeper's 20 s network_partition_timeout (a cut-off primary demotes itself
# first); on one machine there is no partition to wait out: ~3 s, not ~35 s.
MONITOR_GUCS=(
  "pgautofailover.health_check_period=1000"     # [5000] ms between rounds
  "pgautofailover.health_check_timeout=1000"    # [5000] ms connect timeout
  "pgautofailover.health_check_max_retries=1"   # [2] (1 is the minimum)
  "pgautofailover.health_check_retry_delay=200" # [2000] ms
  "pgautofailover.node_considered_unhealthy_timeout=2000" # [20000] ms, 2 missed reports
  "pgautofailover.primary_demote_timeout=1000"  # [30000] ms
  "pgautofailover.startup_grace_period=1000"    # [10000] ms after monitor start
)

die() { echo "pg-ha: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f\n", b - a }'; }
# as_pg CMD...: run as postgres with a clean, DIR-local environment (cwd /,
# the caller's may be unreadable for postgres).
setdir() {
  DIR="$(readlink -m "$1")"
  PGENV=(runuser -u postgres -- env -i -C / PATH="$PGBIN:/usr/bin:/bin" LANG=C.UTF-8
    HOME="$DIR" XDG_CONFIG_HOME="$DIR/xdg/config" XDG_DATA_HOME="$DIR/xdg/data"
    XDG_RUNTIME_DIR="$DIR/xdg/run" PG_REGRESS_SOCK_DIR="$DIR/sock"
    PGHOST="$DIR/sock" PGUSER=postgres PGCONNECT_TIMEOUT=2)
}
as_pg() { "${PGENV[@]}" "$@"; }
sql() { as_pg psql -X -qAt -v ON_ERROR_STOP=1 -p "$1" -d "$2" -c "$3"; } # PORT DB SQL
mon() { sql "$BASE" "$MONDB" "$1"; }
port_of() { case "$1" in a) echo $((BASE + 1));; b) echo $((BASE + 2));; *) die "no node '$1'";; esac; }
other() { [ "$1" = a ] && echo b || echo a; }
url() { echo "postgres://postgres@127.0.0.1:$((BASE + 1)),127.0.0.1:$((BASE + 2))/vaultguard?target_session_attrs=read-write"; }
load() { # DIR -> BASE, ASYNC (written by `up`)
  setdir "${1:?DIR missing}"
  [ -f "$DIR/pgha.env" ] || die "$DIR is not a pg-ha directory (run 'up' first)"
  . "$DIR/pgha.env"
}
# "reportedstate goalstate" of node a|b, as the monitor says.
node_state() { mon "SELECT reportedstate||' '||goalstate FROM pgautofailover.node WHERE nodename='$1'" 2>/dev/null || true; }
current_primary() { # "NAME PORT" of the node reported AND assigned (wait_)primary
  local n; for n in a b; do case "$(node_state "$n")" in
    "primary primary"|"wait_primary wait_primary") echo "$n $(port_of "$n")"; return 0;;
  esac; done; return 1
}

# Settled: one node primary, the other secondary (reported == assigned) and,
# unless async, the primary really waits for it (sync/quorum standby).
settled() {
  local p; for p in a b; do
    [ "$(node_state "$p")" = "primary primary" ] || continue
    [ "$(node_state "$(other "$p")")" = "secondary secondary" ] || return 1
    [ "$ASYNC" = 1 ] || [ "$(sql "$(port_of "$p")" vaultguard "SELECT count(*) FROM pg_stat_replication
      WHERE sync_state IN ('sync', 'quorum') AND current_setting('synchronous_standby_names') <> ''" \
      2>/dev/null)" = 1 ]
    return
  done; return 1
}
wait_for() { # SECONDS WHAT CMD...: poll CMD every 0.2 s, or die
  local end; end=$(awk -v t="$1" -v n="$(now)" 'BEGIN { printf "%.3f", n + t }')
  until "${@:3}"; do
    awk -v e="$end" -v n="$(now)" 'BEGIN { exit !(n > e) }' &&
      die "timed out after $1 s waiting for $2 (logs: $DIR/*.log)"
    sleep 0.2
  done
}
# Start `pg_autoctl run` for monitor|a|b in a session of its own: its
# services and the postmaster it starts share its process group.
start_keeper() {
  local n="$1" pidf="$DIR/$1.keeper.pid"
  ps -o args= -p "$(cat "$pidf" 2>/dev/null || echo 0)" 2>/dev/null | grep -q pg_autoctl && return 0
  rm -f "$pidf"
  setsid "${PGENV[@]}" sh -c 'echo $$ > "$0"; exec pg_autoctl run --pgdata "$1"' \
    "$pidf" "$DIR/$n" >>"$DIR/$n.log" 2>&1 </dev/null &
  for _ in $(seq 50); do [ -s "$pidf" ] && return 0; sleep 0.1; done
  die "keeper of $n did not start, see $DIR/$n.log"
}
# Live (non-zombie) pids of a node's "machine": the keeper's process group,
# and postmaster.pid's postmaster and children. Pid files count only while
# they still name our processes (pid reuse).
node_pids() {
  local g=-1 pm kp; kp="$(cat "$DIR/$1.keeper.pid" 2>/dev/null || echo 0)"
  ps -o args= -p "$kp" 2>/dev/null | grep -q pg_autoctl && g="$(ps -o pgid= -p "$kp" | tr -d ' ')"
  pm="$(head -n1 "$DIR/$1/postmaster.pid" 2>/dev/null || true)"
  ps -o args= -p "${pm:-0}" 2>/dev/null | grep -qF -- "-D $DIR/$1 " || pm=-1
  ps -eo pid=,ppid=,pgid=,stat= |
    awk -v g="$g" -v pm="$pm" '$4 !~ /^Z/ && ($3 == g || $1 == pm || $2 == pm) { print $1 }'
}

cmd_check() {
  local miss="" b
  command -v pg_autoctl >/dev/null || miss+=" pg_autoctl"
  for b in postgres pg_ctl pg_controldata pg_rewind psql; do [ -x "$PGBIN/$b" ] || miss+=" $PGBIN/$b"; done
  [ -f "/usr/share/postgresql/$PG_MAJOR/extension/pgautofailover.control" ] || miss+=" pgautofailover-extension"
  [ -z "$miss" ] && return 0
  die "missing:$miss; install: apt-get install -y postgresql-${PG_MAJOR:-<major>}-auto-failover pg-auto-failover-cli"
}

# Installs Debian's pg_autoctl and the extension for the installed
# PostgreSQL when missing (scripts/test.sh and scripts/bench.sh call it).
cmd_install() {
  (cmd_check) 2>/dev/null && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    "postgresql-$PG_MAJOR-auto-failover" pg-auto-failover-cli >/dev/null
  cmd_check
}

cmd_up() {
  setdir "${1:?usage: up DIR BASEPORT [--async]}"; BASE="${2:?BASEPORT missing}"
  [[ "$BASE" =~ ^[0-9]+$ ]] || die "BASEPORT must be a number"
  ASYNC=0; [ "${3:-}" = --async ] && ASYNC=1
  cmd_check
  if [ -f "$DIR/pgha.env" ]; then # already up: just print the URL again
    load "$DIR"; settled || die "$DIR exists but the formation is not healthy; run 'down $DIR' first"
    url; return 0
  fi
  [ -e "$DIR" ] && die "$DIR exists and is not a pg-ha directory"
  [ ${#DIR} -le 70 ] || die "DIR too long for unix socket paths (max 70 chars)"
  for p in "$BASE" $((BASE + 1)) $((BASE + 2)); do # anything listening there?
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && die "port $p is already in use"; done
  install -d -m 0700 -o postgres -g postgres "$DIR" "$DIR/sock" "$DIR/xdg" \
    "$DIR/xdg/config" "$DIR/xdg/data" "$DIR/xdg/run"
  printf 'BASE=%s\nASYNC=%s\n' "$BASE" "$ASYNC" >"$DIR/pgha.env"

  # Monitor: create (initdb + extension), run, tune (reload is enough).
  as_pg pg_autoctl create monitor --pgdata "$DIR/monitor" --pgport "$BASE" \
    --pgctl "$PGBIN/pg_ctl" --hostname 127.0.0.1 --listen 127.0.0.1 \
    --auth trust --no-ssl >>"$DIR/monitor.log" 2>&1 ||
    die "pg_autoctl create monitor failed, see $DIR/monitor.log"
  start_keeper monitor
  wait_for 30 "the monitor" eval 'mon "SELECT 1" >/dev/null 2>&1'
  for g in "${MONITOR_GUCS[@]}"; do mon "ALTER SYSTEM SET ${g%%=*} = '${g#*=}'"; done
  mon "SELECT pg_reload_conf()" >/dev/null

  # Data nodes: a starts as primary, b is cloned from it by pg_basebackup.
  # Sync or async is per node: with the formation's default
  # number_sync_standbys = 0 the primary sets synchronous_standby_names to
  # 'ANY 1 (<standbys with replication-quorum true>)', or '' if there is none.
  # --auth trust: initdb's rules trust 127.0.0.1 for all users, replication
  # included; pg_autoctl adds its own (monitor, replicator).
  local monuri="postgres://autoctl_node@127.0.0.1:$BASE/$MONDB?sslmode=disable"
  local quorum=true; [ "$ASYNC" = 1 ] && quorum=false
  for n in a b; do
    as_pg pg_autoctl create postgres --pgdata "$DIR/$n" --pgport "$(port_of $n)" \
      --pgctl "$PGBIN/pg_ctl" --pghost "$DIR/sock" --listen 127.0.0.1 \
      --hostname 127.0.0.1 --name "$n" --dbname vaultguard --username postgres \
      --monitor "$monuri" --auth trust --no-ssl --replication-quorum "$quorum" \
      >>"$DIR/$n.log" 2>&1 || die "pg_autoctl create postgres ($n) failed, see $DIR/$n.log"
    [ $n = b ] && start_keeper b && continue
    # Data-node GUC (b inherits it): a standby that lost its primary retries
    # every wal_retrieve_retry_interval [5s], and a promote request can wait
    # out that sleep: up to +5 s per failover.
    echo "wal_retrieve_retry_interval = '200ms' # pg-ha.sh" >>"$DIR/a/postgresql.conf"
    start_keeper a
    wait_for 60 "node a to be single" eval '[ "$(node_state a)" = "single single" ]'
  done
  wait_for 120 "a primary and a secondary" settled

  # Checks: app and replication connections over TCP (HBA), streaming, sync.
  for n in a b; do
    as_pg psql -X -qAt "postgres://postgres@127.0.0.1:$(port_of $n)/vaultguard" \
      -c 'SELECT 1' >/dev/null || die "cannot connect to node $n over TCP"
    as_pg psql -X -qAt "postgres://postgres@127.0.0.1:$(port_of $n)/vaultguard?replication=true" \
      -c 'IDENTIFY_SYSTEM' >/dev/null || die "no replication connection to node $n"
  done
  local p ssn; p="$(current_primary | cut -d' ' -f2)"
  [ "$(sql "$p" vaultguard "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" = 1 ] ||
    die "the standby is not streaming from the primary"
  ssn="$(sql "$p" vaultguard 'SHOW synchronous_standby_names')"
  [ "$(sql "$p" vaultguard 'SHOW synchronous_commit')" = on ] || die "synchronous_commit is not on"
  if [ "$ASYNC" = 1 ]; then [ -z "$ssn" ] || die "async asked, but synchronous_standby_names='$ssn'"
  else [ -n "$ssn" ] || die "synchronous_standby_names is empty on the primary"; fi
  echo "formation up in $DIR: primary port $p, synchronous_standby_names='$ssn'" >&2
  url
}

cmd_kill_primary() {
  load "$1"
  local p pids; p="$(current_primary | cut -d' ' -f1)" || die "no primary right now"
  [ -n "$(node_pids "$(other "$p")")" ] || die "node $(other "$p") is down; rejoin it first"
  pids="$(node_pids "$p" | sort -u | tr '\n' ' ')"
  [ -n "$pids" ] || die "node $p has no live process (killed already? the monitor has not noticed yet)"
  now >"$DIR/killed_at"; echo "$p" >"$DIR/killed"
  # One kill, no grace period: nothing gets to flush, report or restart.
  kill -KILL $pids 2>/dev/null || true
  for _ in $(seq 50); do [ -z "$(node_pids "$p")" ] && break; sleep 0.1; done
  [ -z "$(node_pids "$p")" ] || die "node $p survived SIGKILL: $(node_pids "$p" | tr '\n' ' ')"
  echo "$p"
}

cmd_wait_primary() {
  load "$1"; local t="${2:-60}" s
  [ -s "$DIR/killed" ] || die "no kill-primary recorded in $DIR"
  s="$(other "$(cat "$DIR/killed")")"
  # Monitor says (wait_)primary; promoted; and past stop_replication, where
  # pg_autoctl holds default_transaction_read_only on (read-write URLs skip it).
  writable() {
    current_primary | grep -q "^$s " &&
      [ "$(sql "$(port_of "$s")" vaultguard "SELECT pg_is_in_recovery()::text ||
           current_setting('transaction_read_only')" 2>/dev/null)" = falseoff ]
  }
  wait_for "$t" "node $s to become a writable primary" writable
  since "$(cat "$DIR/killed_at")" # seconds since the kill, not since this call
}

cmd_rejoin() {
  load "$1"; local n="${2:?NODE missing}" t="${3:-120}" t0; port_of "$n" >/dev/null; t0="$(now)"
  # pg_autoctl 2.0 runs crash recovery before pg_rewind but doesn't wait for
  # that postgres to stop: pg_rewind then often fails ("unclean target") and
  # the keeper falls back to a full pg_basebackup. Do it here, waiting: a
  # standby without upstream replays local WAL (writes none), then stops.
  if [ -z "$(node_pids "$n")" ] &&
    as_pg pg_controldata "$DIR/$n" | grep -q 'cluster state: *in production'; then
    as_pg touch "$DIR/$n/standby.signal"
    as_pg pg_ctl start -w -t 60 -D "$DIR/$n" -o "-p $(port_of "$n") -k $DIR/sock \
      -c listen_addresses= -c logging_collector=off -c primary_conninfo=" \
      >>"$DIR/$n.log" 2>&1 </dev/null || true
    as_pg pg_ctl stop -w -m fast -D "$DIR/$n" >>"$DIR/$n.log" 2>&1 || true
    rm -f "$DIR/$n/standby.signal"
    as_pg pg_controldata "$DIR/$n" | grep -q 'cluster state: *shut down' ||
      die "crash recovery of $n failed, see $DIR/$n.log"
  fi
  start_keeper "$n" # demoted by the monitor -> pg_rewind -> catchingup -> secondary
  rejoined() { [ "$(node_state "$n")" = "secondary secondary" ] && settled; }
  wait_for "$t" "node $n to rejoin as secondary" rejoined
  rm -f "$DIR/killed" "$DIR/killed_at"
  since "$t0"
}

# Switches the running formation between a synchronous and an asynchronous
# standby (the benchmark measures both on one formation): each node's
# replication-quorum flag decides whether the primary lists it in
# synchronous_standby_names.
cmd_sync() {
  load "$1"; local want="${2:?usage: sync DIR on|off}" quorum n p
  case "$want" in on) quorum=true; ASYNC=0;; off) quorum=false; ASYNC=1;; *) die "sync: on or off";; esac
  for n in a b; do
    as_pg pg_autoctl set node replication-quorum "$quorum" --pgdata "$DIR/$n" >>"$DIR/$n.log" 2>&1 ||
      die "pg_autoctl set node replication-quorum on $n failed, see $DIR/$n.log"
  done
  printf 'BASE=%s\nASYNC=%s\n' "$BASE" "$ASYNC" >"$DIR/pgha.env"
  # The primary applies the change (state apply_settings) and is primary again.
  wait_for 60 "the primary to apply the settings" eval 'current_primary >/dev/null'
  p="$(current_primary | cut -d' ' -f2)"
  applied() {
    local ssn; ssn="$(sql "$p" vaultguard 'SHOW synchronous_standby_names' 2>/dev/null)" || return 1
    if [ "$ASYNC" = 1 ]; then [ -z "$ssn" ]; else [ -n "$ssn" ] && settled; fi
  }
  wait_for 60 "synchronous_standby_names to follow (sync $want)" applied
  echo "sync $want: synchronous_standby_names='$(sql "$p" vaultguard 'SHOW synchronous_standby_names')'"
}

cmd_down() {
  setdir "${1:?DIR missing}"
  [ -e "$DIR" ] || return 0
  [ -f "$DIR/pgha.env" ] || die "$DIR is not a pg-ha directory, refusing to remove it"
  local n pids=""
  for n in a b monitor; do as_pg timeout 30 pg_autoctl stop --pgdata "$DIR/$n" --fast >/dev/null 2>&1 || true; done
  for _ in $(seq 50); do # pg_autoctl stop only signals: give it 10 s
    pids="$(for n in a b monitor; do node_pids $n; done | sort -u | tr '\n' ' ')"
    [ -z "${pids// }" ] && break; sleep 0.2
  done
  [ -z "${pids// }" ] || kill -KILL $pids 2>/dev/null || true
  rm -rf "$DIR"
}

case "${1:-}" in
  up) shift; cmd_up "$@";;
  primary) load "${2:-}"; current_primary || die "no primary right now";;
  kill-primary) cmd_kill_primary "${2:-}";;
  wait-primary) shift; cmd_wait_primary "$@";;
  rejoin) shift; cmd_rejoin "$@";;
  sync) shift; cmd_sync "$@";;
  down) cmd_down "${2:-}";;
  install) cmd_install;;
  check) cmd_check; echo "ok: $(pg_autoctl --version | head -n1), PostgreSQL $PG_MAJOR in $PGBIN";;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2;;
esac
