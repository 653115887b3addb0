#!/usr/bin/env bash
# Opt-in soak (see tests/soak.py): tests/soak.sh [REQUESTS, default 1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /var/tmp/wasmpool-target ]; then
  export CARGO_TARGET_DIR=/var/tmp/wasmpool-target
fi
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release --locked
WASMPOOL_GUESTS_WAT_ONLY=1 cargo bench --locked --bench guests -- "$target/soak/guests"
mkdir -p "$target/soak/cache"
python3 tests/soak.py "$target/release/wasmpool" "$target/soak/guests" "$target/soak/cache" "${1:-1000000}"
