#!/usr/bin/env bash
# The C library installed from source the way the README says: `cargo
# cinstall` (cargo-c) into a temporary prefix, checked file by file, then
# the quick start built with that prefix's pkg-config, linked shared and
# static, and run. Run by tests/run-all.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-cinstall >/dev/null || cargo install --locked --quiet cargo-c@0.10.24
meta=$(cargo metadata --format-version 1 --no-deps --locked)
target=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$meta")
version=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["packages"][0]["version"])' <<<"$meta")
# cargo-c builds with a cargo of its own, whose fingerprints differ from
# the toolchain's: it gets a target directory of its own (as in
# packaging/build-deb.sh, which shares it).
capi_target=${WASMPOOL_CAPI_TARGET_DIR:-$target/cargo-c}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/prefix"
cargo cinstall --release --locked --target-dir "$capi_target" \
  --prefix "$prefix" --libdir "$prefix/lib" >&2

fail() {
  echo "cinstall: $*" >&2
  exit 1
}
lib="$prefix/lib"
[ -f "$lib/libwasmpool.so.$version" ] || fail "no $lib/libwasmpool.so.$version"
[ "$(readlink "$lib/libwasmpool.so.0")" = "libwasmpool.so.$version" ] || fail "libwasmpool.so.0 does not link to libwasmpool.so.$version"
[ "$(readlink "$lib/libwasmpool.so")" = "libwasmpool.so.$version" ] || fail "libwasmpool.so does not link to the library"
[ -f "$lib/libwasmpool.a" ] || fail "no static library"
soname=$(objdump -p "$lib/libwasmpool.so.$version" | awk '$1 == "SONAME" {print $2}')
[ "$soname" = libwasmpool.so.0 ] || fail "SONAME is '$soname', not libwasmpool.so.0"
cmp "$prefix/include/wasmpool.h" include/wasmpool.h || fail "the installed header is not include/wasmpool.h"
export PKG_CONFIG_PATH="$lib/pkgconfig"
[ "$(pkg-config --modversion wasmpool)" = "$version" ] || fail "pkg-config --modversion is not $version"

# Shared: found through the prefix's pkg-config, SONAME recorded.
cc -Wall -Werror -o "$tmp/quickstart" ffi/examples/quickstart.c \
  $(pkg-config --cflags --libs wasmpool) -Wl,-rpath,"$lib"
objdump -p "$tmp/quickstart" | grep -q 'NEEDED *libwasmpool.so.0' || fail "the program does not need libwasmpool.so.0"
export XDG_CACHE_HOME="$tmp/cache"
out=$("$tmp/quickstart" examples/hello.wasm)
[ "$out" = "200 Hello from wasmpool!" ] || fail "shared quick start printed '$out'"

# Static: the archive plus what `pkg-config --static` says it needs.
cc -Wall -Werror -o "$tmp/quickstart-static" ffi/examples/quickstart.c \
  $(pkg-config --cflags wasmpool) "$lib/libwasmpool.a" \
  $(pkg-config --static --libs-only-l wasmpool | sed 's/-lwasmpool\b//')
if objdump -p "$tmp/quickstart-static" | grep -q 'NEEDED *libwasmpool'; then
  fail "the static program needs libwasmpool.so"
fi
out=$("$tmp/quickstart-static" examples/hello.wasm)
[ "$out" = "200 Hello from wasmpool!" ] || fail "static quick start printed '$out'"
echo "cinstall: libwasmpool $version installed by cargo-c into a prefix; shared and static quick starts ran"
