#!/usr/bin/env bash
# A/B of two server binaries on one load tool, interleaved A B A B …: on a
# machine whose speed moves with the hour and with its neighbours, only
# rounds taken side by side compare. Each round is one vaultguard-bench run
# (`--server-bin`) on a fresh database; the machine's load (`uptime`) is
# recorded with it. At the end it prints, per backend and scenario, the
# median ops/s, p50, p99 and server CPU-s/1k of each side over its rounds
# and B/A.
#
#   scripts/bench-ab.sh A_BIN B_BIN [ROUNDS] [-- BENCH_ARGS…]
#   scripts/bench-ab.sh --summary DIR
#
# ROUNDS is the rounds per side (default 3). BENCH_ARGS go to every round,
# for example
#   scripts/bench-ab.sh /var/tmp/ab/vaultguard-before /var/tmp/ab/vaultguard-after 3 -- \
#     --backend postgres --scenarios delegation.allow.eddsa,verify \
#     --duration 6 --warmup 1 --concurrency 64 --watch-streams 0
# BENCH is the load tool (default $CARGO_TARGET_DIR/release/vaultguard-bench,
# built by scripts/bench.sh); AB_OUT the directory that keeps every round's
# output (default a new one under /tmp), which `--summary` reads again, so
# rounds of several invocations (say PostgreSQL, then SQLite) summarise
# together.
set -euo pipefail
cd "$(dirname "$0")/.."

summarise() {
  python3 - "$1" <<'EOF'
import pathlib, re, statistics, sys

out = pathlib.Path(sys.argv[1])
# (backend, scenario) -> side -> [(ops/s, p50, p99, server CPU-s/1k)]
rows, loads = {}, {"A": [], "B": []}
for path in sorted(out.glob("r*-[AB].txt")):
    side = path.stem[-1]
    backend = None
    for line in path.read_text().splitlines():
        if line.startswith("load average"):
            loads[side].append(line.split()[2].rstrip(","))
        title = re.match(r"^(postgres|sqlite) · ", line)
        if title:
            backend = title.group(1)
            continue
        fields = line.split()
        if not line.strip():
            backend = None
        if backend is None or len(fields) != 14 or fields[0] == "scenario":
            continue
        try:
            row = tuple(float(fields[i]) for i in (2, 3, 4, 7))
        except ValueError:
            continue
        rows.setdefault((backend, fields[0]), {"A": [], "B": []})[side].append(row)

def med(values, i):
    return statistics.median(v[i] for v in values) if values else float("nan")

def ratio(a, b, i):
    return med(b, i) / med(a, i) if a and b and med(a, i) else float("nan")

print(f"\nmedians over the rounds of each side ({out})")
print(f"{'backend':<9} {'scenario':<24} {'rounds':>6} {'A ops/s':>9} {'B ops/s':>9} {'B/A':>5}"
      f" {'A p50':>7} {'B p50':>7} {'B/A':>5} {'A p99':>7} {'B p99':>7} {'B/A':>5}"
      f" {'A srv/1k':>8} {'B srv/1k':>8} {'B/A':>5}  ops/s A | B each round")
for (backend, scenario), sides in rows.items():
    a, b = sides["A"], sides["B"]
    each = " ".join(f"{v[0]:.0f}" for v in a) + " | " + " ".join(f"{v[0]:.0f}" for v in b)
    print(f"{backend:<9} {scenario:<24} {len(a):>3}/{len(b):<2} {med(a, 0):>9.0f} {med(b, 0):>9.0f}"
          f" {ratio(a, b, 0):>5.2f} {med(a, 1):>7.2f} {med(b, 1):>7.2f} {ratio(a, b, 1):>5.2f}"
          f" {med(a, 2):>7.2f} {med(b, 2):>7.2f} {ratio(a, b, 2):>5.2f}"
          f" {med(a, 3):>8.3f} {med(b, 3):>8.3f} {ratio(a, b, 3):>5.2f}  {each}")
print(f"1-minute load average at each round's start: A {' '.join(loads['A'])} | B {' '.join(loads['B'])}")
EOF
}

if [[ "${1:-}" == "--summary" ]]; then
  summarise "${2:?usage: bench-ab.sh --summary DIR}"
  exit 0
fi

a_bin="${1:?usage: bench-ab.sh A_BIN B_BIN [ROUNDS] [-- BENCH_ARGS…]}"
b_bin="${2:?usage: bench-ab.sh A_BIN B_BIN [ROUNDS] [-- BENCH_ARGS…]}"
shift 2
rounds=3
if [[ $# -gt 0 && "$1" != "--" ]]; then
  rounds="$1"
  shift
fi
[[ "${1:-}" == "--" ]] && shift
bench="${BENCH:-${CARGO_TARGET_DIR:-/var/tmp/vaultguard-target}/release/vaultguard-bench}"
out="${AB_OUT:-$(mktemp -d /tmp/vaultguard-ab.XXXXXX)}"
mkdir -p "$out"
for binary in "$a_bin" "$b_bin" "$bench"; do
  [[ -x "$binary" ]] || { echo "$binary is not an executable" >&2; exit 1; }
done

# The same lock as scripts/bench.sh: two benchmarks at once distort each other.
exec 9>"${TMPDIR:-/tmp}/vaultguard-bench.lock"
flock 9

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
pg_isready -h 127.0.0.1 -p 5432 >/dev/null

# Rounds already in $out (an earlier invocation) keep their numbers.
first=$(find "$out" -name 'r*-A.txt' | wc -l)
for round in $(seq $((first + 1)) $((first + rounds))); do
  for side in A B; do
    binary="$a_bin"
    [[ "$side" == B ]] && binary="$b_bin"
    file="$out/r$(printf %02d "$round")-$side.txt"
    {
      echo "round $round side $side: $binary"
      echo "$*"
      uptime | sed 's/.*load average/load average/'
    } >"$file"
    echo "== round $round, $side ($binary), $(uptime | sed 's/.*load average/load average/')" >&2
    "$bench" --server-bin "$binary" "$@" 2>&1 | tee -a "$file"
  done
done
summarise "$out"
