#!/usr/bin/env bash
# The benchmark command: builds the server and the load tool in release mode,
# makes sure PostgreSQL runs, then runs every scenario on PostgreSQL and on
# SQLite (each on a fresh database, dropped after) and prints one table per
# backend. Arguments go to vaultguard-bench (`--help`), for example
#   scripts/bench.sh --duration 5
#   scripts/bench.sh --backend postgres --scenarios delegation.allow.eddsa --rate 2000
#   scripts/bench.sh --backend postgres --scale 1e5,1e6,1e7   # the hot paths and audit
#     reads at 10^5..10^7 audit events (and L/10 delegations, L/100 agents, L/1000
#     tenants), seeded by COPY through the real schema (tests/bench/scale.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/vaultguard-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

cargo build --release --locked -q \
  -p vaultguard-server --bin vaultguard \
  -p vaultguard-tests --bin vaultguard-bench

# replication.sync_standby runs a pg_auto_failover formation
# (scripts/pg-ha.sh); its packages are installed when missing.
scripts/pg-ha.sh install

# Two benchmarks at once on one machine distort each other's figures: a
# second run waits here for the first.
exec 9>"${TMPDIR:-/tmp}/vaultguard-bench.lock"
flock 9

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
pg_isready -h 127.0.0.1 -p 5432 >/dev/null
# Databases left behind by an interrupted earlier run.
psql "postgres://postgres@127.0.0.1:5432/postgres" -Atc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'vaultguard_bench_%'" |
  while read -r db; do
    psql -q "postgres://postgres@127.0.0.1:5432/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  done

exec "$CARGO_TARGET_DIR/release/vaultguard-bench" "$@"
