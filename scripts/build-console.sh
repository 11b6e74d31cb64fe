#!/usr/bin/env bash
# Builds the web console (server/console/, see its README.md):
#   1. generates its TypeScript stubs into server/console/gen/ from proto/
#      and the vendored google.rpc protos (buf + protoc-gen-es from npm);
#   2. type-checks the app with tsc (strict);
#   3. bundles and minifies it with esbuild into server/console/dist/
#      (index.html, app.js, app.css), which the server binary embeds.
# Both gen/ and dist/ are committed; the output is deterministic, so a clean
# `git diff --exit-code server/console/gen server/console/dist` after this
# script proves the committed bundle is what the sources build.
# Needs `npm install` at the repository root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

for tool in buf protoc-gen-es tsc esbuild; do
  if [ ! -x "node_modules/.bin/$tool" ]; then
    echo "build-console: node_modules/.bin/$tool missing; run npm install at the repository root" >&2
    exit 1
  fi
done

node_modules/.bin/buf generate --template server/console/buf.gen.yaml
node_modules/.bin/tsc -p server/console/tsconfig.json
node server/console/build.mjs
