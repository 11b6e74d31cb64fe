#!/usr/bin/env bash
# Rewrites the buf breaking-change baseline from the current proto/. Run it
# only when the contract has changed compatibly (buf breaking passes) or a
# break is intended and announced; commit the result with the proto change.
set -euo pipefail
cd "$(dirname "$0")/.."
npx buf build --exclude-source-info -o .ci/buf-baseline.binpb
