#!/bin/sh
# Builds the componentize-js benchmark guests from the Hono app in app.js:
#   OUT_DIR/js_fetch.wasm  fetch.js: a StarlingMonkey fetch-event handler. Its
#                          instances answer only their first request: serve
#                          it with --max-instance-reuse-count 1.
#   OUT_DIR/js_reuse.wasm  reuse.js: exports wasi:http/incoming-handler@0.2.10
#                          itself, so one instance serves many requests.
# Needs node and npm (and the npm registry, or a warm npm cache, for the
# first npm install).
#
# Usage: benches/js/build.sh OUT_DIR
set -eu
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."

npm install --prefix benches/js --no-audit --no-fund --loglevel=error

bin=benches/js/node_modules/.bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for entry in fetch reuse; do
  # One ES module; the wasi:* imports are left for componentize-js to bind.
  "$bin/esbuild" "benches/js/$entry.js" --bundle --format=esm --platform=neutral \
    '--external:wasi:*' --log-level=warning --outfile="$work/$entry.js"
  "$bin/componentize-js" "$work/$entry.js" -w benches/js/wit -n app -o "$out/js_$entry.wasm"
done
ls -l "$out/js_fetch.wasm" "$out/js_reuse.wasm"
