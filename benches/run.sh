#!/usr/bin/env bash
# The whole benchmark in one command: builds everything in release mode,
# installs the other servers and load generators outside the checkout when
# missing, runs every scenario (benches/bench.py), the C-vs-Rust API push
# comparison and the Criterion micro-benchmarks, and writes
# docs/benchmarks.md and docs/benchmarks.svg.
#
#   benches/run.sh [--rounds N] [--seconds S] [--only REGEX]
#
# The JavaScript guests are built from benches/js (npm: Hono, esbuild,
# componentize-js). The first run installs wasmtime-cli 48.0.8 (about 25 minutes on 2 cores)
# and oha into $WASMPOOL_BENCH_TOOLS (default /var/cache/wasmpool-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${WASMPOOL_BENCH_TOOLS:-/var/cache/wasmpool-bench}
export WASMPOOL_BENCH_TOOLS=$tools
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
command -v systemd-socket-activate >/dev/null || apt-get install -y -qq systemd >/dev/null
if [ ! -x "$tools/wasmtime-48.0.8/bin/wasmtime" ]; then
  cargo install --locked --quiet wasmtime-cli@48.0.8 --root "$tools/wasmtime-48.0.8"
fi
if [ ! -x "$tools/oha/bin/oha" ]; then
  cargo install --locked --quiet oha@1.16.0 --root "$tools/oha"
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore componentize-py==0.25.1
COMPONENTIZE_PY="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/componentize-py"
[ -x "$COMPONENTIZE_PY" ] || COMPONENTIZE_PY="$(command -v componentize-py)"
export COMPONENTIZE_PY

if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /var/tmp/wasmpool-target ]; then
  export CARGO_TARGET_DIR=/var/tmp/wasmpool-target
fi
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
out="$target/bench"
mkdir -p "$out"

# One build of everything (one feature resolution: no rebuilds between).
cargo build --release --locked --bins --lib --example native_hello --example api_push
cargo bench --locked --bench guests -- "$out/guests"
command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; }
benches/js/build.sh "$out/guests"
# The C harness loads the library by its SONAME: link it, fresh, beside it
# (a stale libwasmpool.so.0 elsewhere must not be what gets measured).
ln -sf "$target/release/libwasmpool.so" "$out/libwasmpool.so.0"
cc -O2 -std=c11 -Wall -Werror -I include ffi/bench/push_bench.c \
  -L "$target/release" -Wl,-rpath,"$out" -lwasmpool -lpthread \
  -o "$out/push_bench"
cp "$target/release/examples/api_push" "$out/api_push"
# The nginx module, for Debian's nginx (nginx-dev), on the same library.
command -v nginx >/dev/null && [ -f /usr/share/nginx/src/configure ] ||
  { apt-get update -qq && apt-get install -y -qq nginx nginx-dev >/dev/null; }
rm -rf "$out/nginx-build"
module=$(WASMPOOL_LIB_DIR="$target/release" WASMPOOL_RPATH="$out" BUILD_DIR="$out/nginx-build" \
  ffi/nginx/build.sh | tail -n 1)

python3 benches/bench.py --bin "$target/release/wasmpool" \
  --native "$target/release/examples/native_hello" --guests "$out/guests" \
  --api-bins "$out" --nginx-module "$module" --out "$out/results.json" "$@"
cargo bench --locked --bench engine -- --noplot 2>&1 | tee "$out/criterion.txt"
python3 benches/report.py "$out/results.json" "$out/criterion.txt" \
  docs/benchmarks.md docs/benchmarks.svg
