#!/usr/bin/env bash
# The container image and the Kubernetes manifests, with Debian's podman:
#   - packaging/oci/build.sh builds the image (FROM scratch, at most 64 MB);
#   - it runs non-root, read-only, under a memory limit that the memory
#     budget follows, serves hello on 8080 and health/metrics on 9090, and
#     compiles nothing at start (the seed cache);
#   - SIGTERM: /readyz 503 at once, still serving for the shutdown delay,
#     then exit 0;
#   - bad input: no component, an unreadable config, a memory limit too
#     small, a cache that cannot be written: a one-line reason;
#   - a config mounted read-only and serve flags after the image change it;
#   - the app image of examples/app-image/ starts without compiling;
#   - deploy/kubernetes/ validates (tests/deploy/kubernetes_check.py) and
#     `podman kube play` runs its Deployment, answering on a published port.
# Needs root and podman (tests/run-all.sh installs it). Prints
# "N passed, N failed" last.
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

# Podman here needs runc and no default ulimits (crun cannot set rlimits in
# this sandbox); a containers.conf of the test's own says so.
work=$(mktemp -d)
if [ -z "${CONTAINERS_CONF:-}" ]; then
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' >"$work/containers.conf"
  export CONTAINERS_CONF="$work/containers.conf"
fi
names=()
cleanup() {
  for n in "${names[@]}"; do podman rm -f -t 0 "$n" >/dev/null 2>&1 || true; done
  podman volume rm -f wasmpool-test-cache >/dev/null 2>&1 || true
  if [ -n "${kube_file:-}" ]; then podman kube down "$kube_file" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

image=$(packaging/oci/build.sh | tail -n 1)
echo "image: $image"
check "build.sh prints localhost/wasmpool:VERSION last" grep -Eqx 'localhost/wasmpool:[0-9]+\.[0-9]+\.[0-9]+' <<<"$image"
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "image size: $((size / 1024 / 1024)) MiB ($size bytes)"
check "the image is at most 64 MB" [ "$size" -le 64000000 ]
check "the image has no base layer (FROM scratch): two layers" \
  [ "$(podman image inspect --format '{{len .RootFS.Layers}}' "$image")" -le 5 ]
check "the image runs as user 65532" [ "$(podman image inspect --format '{{.Config.User}}' "$image")" = "65532:65532" ]

# A free loopback port.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits until URL answers with STATUS (10 s at most).
wait_for() {
  local url=$1 want=$2
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" = "$want" ] && return 0
    sleep 0.1
  done
  return 1
}
run() { # NAME ARGS... : a detached container, removed at the end
  local name=$1; shift
  names+=("$name")
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  podman run -d --name "$name" "$@" >/dev/null
}

# 1. The image as users run it: read-only, non-root, a memory limit, the
#    cache on a volume.
p=$(port); m=$(port)
run wp-main --read-only --memory 256m -v wasmpool-test-cache:/var/cache/wasmpool \
  -p "127.0.0.1:$p:8080" -p "127.0.0.1:$m:9090" "$image"
check "it becomes ready" wait_for "http://127.0.0.1:$m/readyz" 200
check "it serves the bundled hello component on 8080" \
  [ "$(curl -s "http://127.0.0.1:$p/")" = "Hello from wasmpool!" ]
check "/healthz on 9090" [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$m/healthz")" = 200 ]
pid=$(podman inspect --format '{{.State.Pid}}' wp-main)
check "the process runs as uid 65532" grep -Eq '^Uid:\s+65532\s' "/proc/$pid/status"
check "the root filesystem is read-only" [ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' wp-main)" = true ]
check "the root filesystem cannot be written" grep -Eq '^[0-9]+ [0-9]+ [0-9:]+ / / ro[,\ ]' "/proc/$pid/mountinfo"
metrics=$(curl -s "http://127.0.0.1:$m/metrics")
budget=$(awk '/^wasmpool_memory_budget_bytes /{print $2}' <<<"$metrics")
echo "memory budget under --memory 256m: $budget bytes"
check "the memory budget follows the container's limit (0 < budget < 256 MiB)" \
  [ "${budget:-0}" -gt 0 ] && [ "${budget:-0}" -lt $((256 << 20)) ]
logs=$(podman logs wp-main 2>&1)
check "the log names the cgroup limit" grep -q 'memory budget .* of 256MiB (cgroup memory' <<<"$logs"
check "nothing is compiled at start (the seed cache)" grep -q 'cache=Hit' <<<"$logs"

# 2. SIGTERM: /readyz 503 at once, still serving for the shutdown delay
#    (5 s in the image), then exit 0.
start=$(date +%s.%N)
podman kill --signal TERM wp-main >/dev/null
check "/readyz says 503 at once after SIGTERM" wait_for "http://127.0.0.1:$m/readyz" 503
served=0
for _ in 1 2 3; do
  [ "$(curl -s "http://127.0.0.1:$p/")" = "Hello from wasmpool!" ] && served=$((served + 1))
  sleep 1
done
check "requests are still served during the shutdown delay ($served of 3)" [ "$served" = 3 ]
check "draining shows in the metrics" grep -q '^wasmpool_draining 1' <(curl -s "http://127.0.0.1:$m/metrics")
code=$(podman wait wp-main)
took=$(python3 -c "import time; print(round(time.time() - $start, 1))")
echo "SIGTERM to exit: ${took}s"
check "exit status 0 after SIGTERM" [ "$code" = 0 ]
check "the shutdown delay held (${took}s >= 5s)" python3 -c "import sys; sys.exit(not $took >= 5)"
check "the log says it is draining" grep -q 'SIGTERM: draining' <(podman logs wp-main 2>&1)

# 3. A second SIGTERM ends the delay.
run wp-twice --read-only "$image"
for _ in $(seq 50); do podman logs wp-twice 2>&1 | grep -q ' ready$' && break; sleep 0.1; done
podman kill --signal TERM wp-twice >/dev/null; sleep 0.3
start=$(date +%s.%N)
podman kill --signal TERM wp-twice >/dev/null
podman wait wp-twice >/dev/null
took=$(python3 -c "import time; print(round(time.time() - $start, 1))")
check "a second SIGTERM skips the rest of the delay (${took}s)" python3 -c "import sys; sys.exit(not $took < 3)"

# 4. Configuration: a config mounted read-only, and serve flags.
mkdir -p "$work/conf"
cat >"$work/conf/wasmpool.toml" <<'EOF'
component = "/app/app.wasm"
listen = ["0.0.0.0:8081"]
metrics-listen = "0.0.0.0:9091"
cache-dir = "/var/cache/wasmpool"
cache-seed-dir = "/usr/lib/wasmpool/cache"
max-concurrent-requests = 8
EOF
chmod -R a+rX "$work/conf"
p=$(port); m=$(port)
run wp-conf --read-only -v "$work/conf:/etc/wasmpool:ro" -p "127.0.0.1:$p:8081" -p "127.0.0.1:$m:9091" "$image"
check "a config mounted read-only at /etc/wasmpool is used" wait_for "http://127.0.0.1:$p/" 200
p=$(port)
run wp-flag --read-only -p "127.0.0.1:$p:8082" "$image" --listen 0.0.0.0:8082 --max-concurrent-requests 4
check "serve flags after the image override its config" wait_for "http://127.0.0.1:$p/" 200

# 5. Bad input: a one-line reason and a non-zero exit, no crash loop.
one_error() { # NAME PATTERN ARGS...: the container exits non-zero with one error line
  local name=$1 pattern=$2; shift 2
  names+=("$name")
  podman rm -f "$name" >/dev/null 2>&1 || true
  local out code
  out=$(podman run --name "$name" "$@" 2>&1) && code=0 || code=$?
  echo "     $name: exit $code: $(grep '^error' <<<"$out" | head -n 1)"
  [ "$code" != 0 ] && [ "$(grep -c '^error: ' <<<"$out")" = 1 ] && grep -q "$pattern" <<<"$out"
}
mkdir -p "$work/nocomp"
printf 'listen = ["0.0.0.0:8080"]\n' >"$work/nocomp/wasmpool.toml"
chmod -R a+rX "$work/nocomp"
check "started without a component: says so" \
  one_error wp-nocomp 'no component given' --read-only -v "$work/nocomp:/etc/wasmpool:ro" "$image"
mkdir -p "$work/secret"
cp "$work/conf/wasmpool.toml" "$work/secret/"
chmod 700 "$work/secret"; chmod 600 "$work/secret/wasmpool.toml"
check "a config the user cannot read: says so" \
  one_error wp-secret 'wasmpool.toml' --read-only -v "$work/secret:/etc/wasmpool:ro" "$image"
check "a memory limit below what wasmpool needs: says what to raise" \
  one_error wp-small 'raise the memory limit' --read-only --memory 48m "$image"
check "a component that is not there: says so" \
  one_error wp-missing '/app/nope.wasm' --read-only "$image" /app/nope.wasm

# 6. A component the seed does not hold, with a cache that cannot be
#    written: it is compiled, served, and the log says so once. (hello with
#    a custom section appended: other bytes, the same behaviour.)
mkdir -p "$work/app"
cp examples/hello.wasm "$work/app/app.wasm"
printf '\x00\x06\x04testx' >>"$work/app/app.wasm"
chmod -R a+rX "$work/app"
p=$(port)
run wp-nocache --read-only -v "$work/app:/app:ro" -p "127.0.0.1:$p:8080" "$image"
check "a cache that cannot be written: still serves" wait_for "http://127.0.0.1:$p/" 200
check "... and says so once" [ "$(podman logs wp-nocache 2>&1 | grep -c 'cannot write the compile cache')" = 1 ]

# 7. The app image example: the app compiled at build time, so a new
#    container compiles nothing, even with an empty cache volume.
podman build --quiet --network none --pull=never --build-arg "WASMPOOL_IMAGE=$image" \
  -t localhost/wasmpool-test-app:1 -f examples/app-image/Containerfile "$work/app" >/dev/null
mkdir -p "$work/emptycache"
chmod 777 "$work/emptycache"
p=$(port)
run wp-app --read-only --memory 256m -v "$work/emptycache:/var/cache/wasmpool" -p "127.0.0.1:$p:8080" \
  localhost/wasmpool-test-app:1
check "the app image serves" wait_for "http://127.0.0.1:$p/" 200
check "the app image compiled nothing at start" grep -q 'cache=Hit' <(podman logs wp-app 2>&1)
podman rm -f -t 0 wp-app >/dev/null 2>&1 || true
podman rmi -f localhost/wasmpool-test-app:1 >/dev/null 2>&1 || true

# 8. The Kubernetes manifests: validated, then played by podman.
python3 tests/deploy/kubernetes_check.py && ok "deploy/kubernetes/ validates (kubernetes-validate --strict) and its checks hold" \
  || bad "deploy/kubernetes/ validation"
kube_file="$work/kube.yaml"
hp=$(port)
python3 - "$image" "$hp" >"$kube_file" <<'EOF'
# The base kustomization as kubectl would apply it, with what only a test
# needs: one replica, the image just built, and the http port published on
# loopback (the manifests themselves have no hostPort: the restricted Pod
# Security Standard forbids it).
import subprocess, sys, yaml
docs = list(yaml.safe_load_all(subprocess.run(
    [sys.executable, "tests/deploy/kubernetes_check.py", "--render", "deploy/kubernetes"],
    check=True, capture_output=True, text=True).stdout))
keep = []
for d in docs:
    if d["kind"] == "Deployment":
        d["spec"]["replicas"] = 1
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["image"] = sys.argv[1]
        for p in c["ports"]:
            if p["name"] == "http":
                p["hostPort"] = int(sys.argv[2])
                p["hostIP"] = "127.0.0.1"
    if d["kind"] in ("Deployment", "ConfigMap"):
        keep.append(d)
print(yaml.safe_dump_all(keep, sort_keys=False), end="")
EOF
if podman kube play "$kube_file" >"$work/play.log" 2>&1; then
  ok "podman kube play runs the Deployment"
  check "the played Deployment answers through its published port" wait_for "http://127.0.0.1:$hp/" 200
  [ "$(curl -s "http://127.0.0.1:$hp/")" = "Hello from wasmpool!" ] && ok "... with hello" || bad "... with hello"
  ctr=$(podman ps --format '{{.Names}}' | grep -- '-wasmpool$' | head -n 1)
  kpid=$(podman inspect --format '{{.State.Pid}}' "$ctr")
  check "the played pod runs as uid 65532" grep -Eq '^Uid:\s+65532\s' "/proc/$kpid/status"
  check "the played pod's root filesystem is read-only" \
    [ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$ctr")" = true ]
  check "the played pod takes its budget from limits.memory (512Mi)" \
    grep -q 'memory budget .* of 512MiB (cgroup' <(podman logs "$ctr" 2>&1)
  check "the played pod uses the ConfigMap's config (JSON logs from args)" \
    grep -q '"message":"ready"' <(podman logs "$ctr" 2>&1)
else
  bad "podman kube play: $(tail -n 3 "$work/play.log")"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
