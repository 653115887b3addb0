#!/usr/bin/env bash
# Builds the Debian packages, split the Debian way, into TARGET/debian/:
#   wasmpool         the server: binary, units, man page, config
#   libwasmpool0     the shared library, in the multiarch directory
#   libwasmpool-dev  header, pkg-config file, .so link, static library
#   libnginx-mod-http-wasmpool
#                    the nginx module (ffi/nginx/) for the installed nginx,
#                    made by packaging/build-deb-nginx.sh from the library
#                    package (it can run alone on one: see its header)
# The library files are what `cargo cinstall` installs (built by cargo-c in
# a target directory of its own: its cargo fingerprints builds differently
# from the toolchain's, so sharing one would rebuild everything each time).
# Needs cargo-deb 3.8.0 and cargo-c 0.10.24 (installed when missing) and
# dpkg-dev; the nginx module needs nginx-dev. Prints the paths of the four
# packages on its last four lines, in that order.
set -euo pipefail
cd "$(dirname "$0")/.."

meta=$(cargo metadata --format-version 1 --no-deps --locked)
target=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$meta")
version=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["packages"][0]["version"])' <<<"$meta")
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
capi_target=${WASMPOOL_CAPI_TARGET_DIR:-$target/cargo-c}

command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@3.8.0
command -v cargo-cinstall >/dev/null || cargo install --locked --quiet cargo-c@0.10.24

# The server.
cargo build --release --locked --bin wasmpool >&2
gzip -9 -n -c packaging/wasmpool.1 >"$target/release/wasmpool.1.gz"

# The library, installed by cargo-c into a staging root.
stage="$target/release/capi-stage"
rm -rf "$stage"
cargo cinstall --release --locked --target-dir "$capi_target" \
  --prefix /usr --libdir "/usr/lib/$multiarch" --destdir "$stage" >&2
lib="$stage/usr/lib/$multiarch"
# The files the lib and dev packages take (Cargo.toml names them
# target/release/capi/...). cargo-deb strips what it built, not these.
out="$target/release/capi"
rm -rf "$out"
mkdir -p "$out"
strip --strip-unneeded -R .comment -o "$out/libwasmpool.so.$version" "$lib/libwasmpool.so.$version"
strip --strip-debug -R .comment -o "$out/libwasmpool.a" "$lib/libwasmpool.a"
cp "$lib/pkgconfig/wasmpool.pc" "$stage/usr/include/wasmpool.h" "$out/"

mkdir -p "$target/debian"
server=$(cargo deb --no-build --locked --strip --output "$target/debian/" | tail -n 1)
libpkg=$(cargo deb --no-build --locked --variant lib --multiarch=same --output "$target/debian/" | tail -n 1)
devpkg=$(cargo deb --no-build --locked --variant dev --multiarch=same --output "$target/debian/" | tail -n 1)

# cargo-deb writes no shlibs file: add one to the library package, so
# packages built against libwasmpool depend on it (dpkg-shlibdeps).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -R "$libpkg" "$tmp/lib"
printf 'libwasmpool 0 libwasmpool0 (>= %s)\n' "$version" >"$tmp/lib/DEBIAN/shlibs"
chmod 644 "$tmp/lib/DEBIAN/shlibs"
dpkg-deb --root-owner-group -Zxz -b "$tmp/lib" "$libpkg" >/dev/null

# The nginx module, linked against that library package (and depending on
# it through the shlibs file).
nginxpkg=$(packaging/build-deb-nginx.sh "$libpkg" "$target/debian" | tail -n 1)

echo "$server"
echo "$libpkg"
echo "$devpkg"
echo "$nginxpkg"
