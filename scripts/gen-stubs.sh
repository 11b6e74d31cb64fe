#!/usr/bin/env bash
# Generates the client stubs of the polyglot examples from proto/ with
# buf.gen.yaml (local plugins only):
#   examples/python-agent/gen/  grpcio: *_pb2.py, *_pb2.pyi, *_pb2_grpc.py
#   examples/node-agent/gen/    TypeScript for @grpc/grpc-js (ts-proto)
# The stubs are not committed (see ARCHITECTURE.md, "Client stubs"): run this
# after cloning and after every proto change. The tests run it too, into a
# directory of their own.
#
# Usage: scripts/gen-stubs.sh [OUT_BASE]
#   OUT_BASE  where the gen/ directories go instead of the checkout
#             (`buf generate -o`; the paths above are kept below it).
# Needs: `npm install` at the root (buf, ts-proto) and
# `pip install -r examples/python-agent/requirements.txt` (grpcio-tools).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root}" && cd "${1:-$root}" && pwd)"
cd "$root"

if ! python3 -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "gen-stubs: python3 lacks grpcio-tools; pip install -r examples/python-agent/requirements.txt" >&2
  exit 1
fi
for tool in buf protoc-gen-ts_proto; do
  if [ ! -x "node_modules/.bin/$tool" ]; then
    echo "gen-stubs: node_modules/.bin/$tool missing; run npm install at the repository root" >&2
    exit 1
  fi
done

node_modules/.bin/buf generate --template buf.gen.yaml -o "$out"
