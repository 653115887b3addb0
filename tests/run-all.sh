#!/usr/bin/env bash
# Runs every wasmpool test, after installing what the tests need.
# This is the README's test command; .ci/run runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: systemd-socket-activate (hands sockets over
# exactly as systemd does), a C toolchain with sanitizers, valgrind,
# pkg-config, libmicrohttpd and libuv (the C example hosts), curl, slowhttptest,
# testssl and h2load; dpkg-dev and lintian for the Debian packages.
need=()
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v cc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++)
command -v valgrind >/dev/null || need+=(valgrind)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v objdump >/dev/null || need+=(binutils)
command -v curl >/dev/null || need+=(curl)
command -v npm >/dev/null || need+=(npm)
pkg-config --exists libmicrohttpd 2>/dev/null || need+=(libmicrohttpd-dev)
pkg-config --exists libuv 2>/dev/null || need+=(libuv1-dev)
# Attack tools the hostile-traffic tests run (tests/attacks.rs), and the
# TLS and HTTP/2 checkers of tests/front.rs.
command -v slowhttptest >/dev/null || need+=(slowhttptest)
command -v testssl >/dev/null || need+=(testssl.sh)
command -v h2load >/dev/null || need+=(nghttp2-client)
# The package's end-to-end test boots a Debian root under systemd-nspawn.
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v dpkg-scanpackages >/dev/null || need+=(dpkg-dev)
command -v lintian >/dev/null || need+=(lintian)
# The container image (podman, runc) and the fleet behind a stock load
# balancer (HAProxy, nginx).
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
# The nginx module (ffi/nginx/, and its package) builds against Debian's
# nginx-dev.
[ -f /usr/share/nginx/src/configure ] || need+=(nginx-dev)
# ... and is tested over TLS (openssl makes the certificate).
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Guests from a real toolchain are built at test time.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore componentize-py==0.25.1
COMPONENTIZE_PY="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/componentize-py"
[ -x "$COMPONENTIZE_PY" ] || COMPONENTIZE_PY="$(command -v componentize-py)"
export COMPONENTIZE_PY
# componentize-js (npm), pinned by tests/guests/js/package-lock.json.
# (`npm ci` refuses this lock file over platform-specific optional
# packages it leaves out; `npm install` keeps the locked versions.)
npm install --prefix tests/guests/js --no-audit --no-fund --loglevel=error
# Kubernetes schemas, for checking deploy/kubernetes/ without a cluster.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore kubernetes-validate==1.37.0

# Reuse a build directory outside the checkout when there is one (builds of
# wasmtime take minutes); without it, cargo builds in ./target as usual.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /var/tmp/wasmpool-target ]; then
  export CARGO_TARGET_DIR=/var/tmp/wasmpool-target
  # Other checkouts build into it too, and the library's files carry no
  # hash (it is also a cdylib): rebuild this checkout's crate, keep the
  # dependencies.
  cargo clean --quiet -p wasmpool
fi

cargo clippy --locked --all-targets -- -D warnings
cargo test --locked

# build.rs regenerates include/wasmpool.h; the committed one must match.
if git rev-parse --git-dir >/dev/null 2>&1; then
  if ! git diff --quiet -- include/wasmpool.h; then
    echo "include/wasmpool.h is stale: commit the header build.rs generated" >&2
    git --no-pager diff --stat -- include/wasmpool.h >&2
    exit 1
  fi
fi

# The nginx module (ffi/nginx/) in Debian's nginx: on the release library
# (1 GiB each way through it; the packages below build it anyway), with
# the Python guest `cargo test` built and the WAT suite guest; its short
# valgrind run on the debug library.
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --locked --release --lib
WASMPOOL_GUESTS_WAT_ONLY=1 cargo bench --locked --profile dev --bench guests -- "$target/tmp/nginx-guests"
REQUIRE_GUESTS=1 PYTHON_WASM="$target/tmp/python-p2/app.wasm" \
  SUITE_WASM="$target/tmp/nginx-guests/p2_suite.wasm" \
  WASMPOOL_LIB_DIR="$target/release" VALGRIND_LIB_DIR="$target/debug" \
  ffi/nginx/test.sh

# The C library installed from source with cargo-c, used through pkg-config.
command -v cargo-cinstall >/dev/null || cargo install --locked --quiet cargo-c@0.10.24
tests/cinstall.sh

# The fuzz targets (fuzz/), 30 s each; `tests/fuzz.sh 3600` for long runs.
tests/fuzz.sh 30

# The soak (a million requests per guest, minutes) only when asked for.
if [ "${WASMPOOL_SOAK:-}" = 1 ]; then
  tests/soak.sh
fi

# The Debian package, installed and driven under a real systemd booted in
# a container (needs root; set WASMPOOL_SKIP_E2E=1 to leave it out).
if [ "${WASMPOOL_SKIP_E2E:-}" = 1 ]; then
  echo "WASMPOOL_SKIP_E2E=1: the package end-to-end test did not run" >&2
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "the package end-to-end test needs root (or set WASMPOOL_SKIP_E2E=1)" >&2
  exit 1
fi
# The container image: built FROM scratch, run read-only and non-root
# under a memory limit, and the Kubernetes manifests validated and played.
tests/container.sh

# A fleet of three hosts behind HAProxy and nginx under constant load:
# restarts, a SIGKILL, a rollout (fixed loopback addresses: one at a time).
cargo test --locked --test fleet -- --ignored --test-threads=1 --nocapture

command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@3.8.0
# (server, library, development files, nginx module)
debs=$(packaging/build-deb.sh | tail -n 4)
WASMPOOL_DEBS="$debs" cargo test --locked --test systemd_e2e -- --ignored --nocapture
