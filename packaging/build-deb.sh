#!/usr/bin/env bash
# Builds the Debian package: target/debian/wasmpool_VERSION_ARCH.deb.
# Needs cargo-deb (cargo install --locked cargo-deb@3.8.0). Prints the
# path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
version=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["packages"][0]["version"])')

cargo build --release --locked
# The files cargo-deb takes from target/release/ besides the build outputs.
sed -e 's|@PREFIX@|/usr|' -e 's|@LIBDIR@|${prefix}/lib|' \
  -e 's|@INCLUDEDIR@|${prefix}/include|' -e "s|@VERSION@|$version|" \
  ffi/wasmpool.pc.in >"$target/release/wasmpool.pc"
gzip -9 -n -c packaging/wasmpool.1 >"$target/release/wasmpool.1.gz"
# cargo-deb strips the binary (--strip) but not a library installed under
# another name.
strip --strip-unneeded -o "$target/release/libwasmpool.so.0" "$target/release/libwasmpool.so"

cargo deb --no-build --locked --strip --output "$target/debian/" | tail -n 1
