#!/usr/bin/env bash
# Builds the wasmpool container image with podman, FROM scratch: nothing is
# pulled from a registry. The image holds the release binary and only the
# shared libraries it loads (found with ldd), CA certificates for outbound
# HTTPS, a passwd entry for the non-root user 65532, its config
# (/etc/wasmpool/wasmpool.toml) and the bundled hello component, compiled
# into a read-only seed cache at build time.
#
#   packaging/oci/build.sh [--tag NAME]
#
# Prints the image name (localhost/wasmpool:VERSION) as its last line.
# Where podman needs settings of its own (this sandbox: runc, no default
# ulimits), set CONTAINERS_CONF as for any podman command.
set -euo pipefail
cd "$(dirname "$0")/../.."

meta=$(cargo metadata --format-version 1 --no-deps --locked)
target=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$meta")
version=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["packages"][0]["version"])' <<<"$meta")
image="localhost/wasmpool:$version"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) image="$2"; shift 2 ;;
    *) echo "usage: $0 [--tag NAME]" >&2; exit 2 ;;
  esac
done
command -v podman >/dev/null || { echo "error: podman is not installed (apt-get install podman)" >&2; exit 1; }
cacerts=/etc/ssl/certs/ca-certificates.crt
[ -r "$cacerts" ] || { echo "error: $cacerts is missing (apt-get install ca-certificates)" >&2; exit 1; }

cargo build --release --locked --bin wasmpool >&2
bin="$target/release/wasmpool"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
user="$ctx/user"
mkdir -p "$root/usr/bin" "$root/etc/wasmpool" "$root/etc/ssl/certs" "$root/app" "$root/tmp" \
  "$root/var/cache" "$root/usr/lib/wasmpool" "$root/home" \
  "$user/var/cache/wasmpool" "$user/usr/lib/wasmpool/cache" "$user/home/nonroot"
strip --strip-unneeded -R .comment -o "$root/usr/bin/wasmpool" "$bin"
# The shared libraries the binary loads, at the paths the loader looks in
# (the interpreter included), and nothing else.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp "$cacerts" "$root/etc/ssl/certs/"
cp packaging/oci/passwd packaging/oci/group "$root/etc/"
cp packaging/oci/wasmpool.toml "$root/etc/wasmpool/"
cp examples/hello.wasm "$root/app/app.wasm"
chmod -R a+rX "$root"
chmod 1777 "$root/tmp"
chmod 700 "$user/var/cache/wasmpool" "$user/usr/lib/wasmpool/cache" "$user/home/nonroot"
cp packaging/oci/Containerfile "$ctx/"

podman build --quiet --network none --pull=never \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.title=wasmpool" \
  --label "org.opencontainers.image.licenses=Apache-2.0" \
  -t "$image" -f "$ctx/Containerfile" "$ctx" >&2
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "built $image: $((size / 1024 / 1024)) MiB" >&2
echo "$image"
