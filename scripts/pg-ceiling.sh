#!/usr/bin/env bash
# PostgreSQL's ceiling for durable ALLOW delegations on this machine, with
# no VaultGuard server and no load tool competing for the CPU: pgbench
# writes what the group writers write for each ALLOW (the delegation row,
# its four audit events in the two parties' logs, their pending rows),
# GROUP units per transaction (about what a group commit carries under
# load), on the real schema (`vaultguard migrate`). Sealing is left out, so
# the figure is an upper bound on ALLOWs/s. Run it to see how far a target
# is from what the database alone can do (ARCHITECTURE.md, "Where the time
# goes"). Usage: scripts/pg-ceiling.sh [seconds] [clients] [group] [events]
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_RUN="${1:-10}"
CLIENTS="${2:-4}"
GROUP="${3:-8}"
EVENTS="${4:-4}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/vaultguard-target}"
cargo build --release --locked -q -p vaultguard-server --bin vaultguard

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done

PG="postgres://postgres@127.0.0.1:5432"
DB="vaultguard_ceiling_$$"
WORK="$(mktemp -d)"
cleanup() {
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql -q "$PG/postgres" -c "CREATE DATABASE $DB"
"$CARGO_TARGET_DIR/release/vaultguard" --data-dir "$WORK" --database-url "$PG/$DB" migrate >/dev/null 2>&1

psql -q "$PG/$DB" <<'SQL'
INSERT INTO tenants (id, slug, display_name, status, token_algorithm, created_at, updated_at)
VALUES ('ten_a', 'a', 'A', 'active', 'EdDSA', 0, 0), ('ten_b', 'b', 'B', 'active', 'EdDSA', 0, 0);
INSERT INTO agents (id, tenant_id, name, description, status, secret_digest, secret_rotated_at, created_at, updated_at)
VALUES ('agt_a', 'ten_a', 'agent', '', 'enabled', '\x00', 0, 0, 0);
SQL

# The events of one unit: the decision and the token, in each party's log
# (EVENTS=2 keeps one per party).
VALUES_ROWS="('ten_a','delegation.decided'),('ten_b','delegation.decided')"
if [ "$EVENTS" = 4 ]; then
  VALUES_ROWS="$VALUES_ROWS,('ten_a','delegation.token_issued'),('ten_b','delegation.token_issued')"
fi
# A decision of ~600 bytes, as the server stores it in the row and the
# events' details (kept in a table: pgbench reads ':' as a variable).
DECISION=$(printf '{"outcome":"allow","policy_versions":{"ten_a":3,"ten_b":7},"rules":[{"id":"rul_%032d","name":"allow reads","direction":"inbound","effect":"allow"}],"explanation":"%0400d"}' 0 0)
psql -q "$PG/$DB" -c "CREATE TABLE ceiling_blob AS SELECT '$DECISION'::text AS v"
cat >"$WORK/allow.sql" <<SQL
WITH w AS (
  INSERT INTO delegations (id, requesting_tenant_id, requesting_agent_id, receiving_tenant_id,
    action, scopes, resource, binding_message, context, status, decision, idempotency_key,
    request_hash, ttl_seconds, token_algorithm, signing_kid, created_at, activated_at, expires_at)
  SELECT 'dlg_' || md5(random()::text), 'ten_a', 'agt_a', 'ten_b', 'mail.read', '["mail.read"]',
    'mailbox/inbox', '', '{}', 'active', (SELECT v FROM ceiling_blob), md5(random()::text), md5(random()::text),
    300, 'EdDSA', 'kid_0123456789abcdef', 1, 1, 300001
  FROM generate_series(1, $GROUP)
  ON CONFLICT DO NOTHING RETURNING id
), e AS (
  INSERT INTO audit_events (event_id, tenant_id, occurred_at, actor_kind, actor_subject,
    actor_tenant_id, event_type, subject_ids, outcome, request_id, details)
  SELECT 'evt_' || md5(random()::text), v.t, 1, 'agent', 'agt_a', 'ten_a', v.ty,
    '["' || w.id || '","agt_a","ten_b"]', 'success', 'req_' || md5(random()::text),
    (SELECT v FROM ceiling_blob)
  FROM w, (VALUES $VALUES_ROWS) AS v(t, ty)
  RETURNING id, tenant_id
)
INSERT INTO audit_pending (event_row_id, tenant_id) SELECT id, tenant_id FROM e;
SQL

cpu() { awk '/^cpu / {print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
read -r busy0 idle0 < <(cpu)
pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_RUN" -f "$WORK/allow.sql" "$PG/$DB" >"$WORK/out" 2>&1 || { cat "$WORK/out" >&2; exit 1; }
read -r busy1 idle1 < <(cpu)
tps=$(awk -F'[ =]+' '/^tps/ {print $2; exit}' "$WORK/out")
awk -v tps="$tps" -v g="$GROUP" -v ev="$EVENTS" -v c="$CLIENTS" \
  -v b="$((busy1 - busy0))" -v i="$((idle1 - idle0))" 'BEGIN {
  printf "PostgreSQL alone: %d clients, %d ALLOW units of %d events per transaction: %.0f transactions/s = %.0f ALLOWs/s (machine %.0f%% busy)\n",
    c, g, ev, tps, tps * g, 100 * b / (b + i)
}'
