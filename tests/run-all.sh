#!/usr/bin/env bash
# Runs every wasmpool test, after installing what the tests need.
# This is the README's test command; .ci/run runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd-socket-activate hands sockets over exactly as systemd does.
if ! command -v systemd-socket-activate >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

# Guests from a real toolchain are built at test time.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore componentize-py==0.25.1
COMPONENTIZE_PY="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/componentize-py"
[ -x "$COMPONENTIZE_PY" ] || COMPONENTIZE_PY="$(command -v componentize-py)"
export COMPONENTIZE_PY

# Reuse a build directory outside the checkout when there is one (builds of
# wasmtime take minutes); without it, cargo builds in ./target as usual.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /var/tmp/wasmpool-target ]; then
  export CARGO_TARGET_DIR=/var/tmp/wasmpool-target
fi

cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
