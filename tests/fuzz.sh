#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (libFuzzer + AddressSanitizer):
#   tests/fuzz.sh [SECONDS per target, default 30]
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the one
# stable toolchain here accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz@0.13.2
export RUSTC_BOOTSTRAP=1
# Where the reused build directory exists, the instrumented build gets one
# of its own beside it (its flags differ from every other build, and an
# instrumented release build of wasmtime takes minutes); otherwise
# fuzz/target.
if [ -d /var/tmp/wasmpool-target ]; then
  export CARGO_TARGET_DIR=/var/tmp/wasmpool-fuzz-target
  # Shared with other checkouts: rebuild this checkout's crates.
  cargo clean --quiet --manifest-path fuzz/Cargo.toml --release \
    --target "$(rustc -vV | sed -n 's/^host: //p')" -p wasmpool -p wasmpool-fuzz 2>/dev/null || true
else
  unset CARGO_TARGET_DIR
fi
for t in config capi_request; do
  corpus=$(mktemp -d)
  log=$(mktemp)
  seeds=fuzz/seeds/$t
  mkdir -p "$seeds"
  extra=()
  asan=${ASAN_OPTIONS:-}
  if [ "$t" = capi_request ]; then
    # capi_request keeps two handlers (engine threads) alive across inputs,
    # and their threads run guest code on fiber stacks that LeakSanitizer
    # cannot walk: it then reports the threads' own memory as leaked. Leaks
    # of the C API are checked where handlers are freed: the C tests under
    # ASan+LSan and valgrind (tests/c_api.rs). ASan still checks every
    # access here.
    extra=(-detect_leaks=0)
    asan="detect_leaks=0${asan:+:$asan}"
  fi
  if ASAN_OPTIONS="$asan" cargo fuzz run --fuzz-dir fuzz "$t" "$corpus" "$seeds" -- \
    -max_total_time="$secs" -max_len=4096 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
    echo "fuzz $t: $(grep -E '^Done [0-9]+ runs' "$log")"
  else
    echo "fuzz $t FAILED:" >&2
    grep -E 'ERROR|SUMMARY|panicked|Test unit written|deadly signal' "$log" >&2 || true
    tail -n 60 "$log" >&2
    exit 1
  fi
  rm -rf "$corpus" "$log"
done
