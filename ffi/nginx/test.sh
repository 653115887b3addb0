#!/bin/bash
# Smoke test of ngx_http_wasmpool_module: builds it (build.sh), runs the
# installed nginx with it on 127.0.0.1 and checks a few requests with curl.
# Prints "ok ..." per check; exits non-zero on the first failure.
#
# Environment:
#   WASMPOOL_LIB_DIR   directory with libwasmpool.so (default: the first of
#                      $CARGO_TARGET_DIR, /var/tmp/wasmpool-target, <repo>/target
#                      {release,debug} that has one)
#   WASMPOOL_CACHE_DIR compile cache for the workers (default
#                      $HOME/.cache/wasmpool, the server's default; nginx
#                      workers get no $HOME of their own)
#   PYTHON_WASM        python guest with /echo and /big/N (default
#                      /var/tmp/wasmpool-target/tmp/python-p2/app.wasm; its
#                      checks are skipped if it does not exist)
#   NGINX              nginx binary (default /usr/sbin/nginx)
#   KEEP=1             keep the temporary directory
#   LOG_LEVEL          error_log level of the test nginx (default info)
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
NGINX=${NGINX:-/usr/sbin/nginx}
HELLO=$repo/examples/hello.wasm
PYTHON_WASM=${PYTHON_WASM:-/var/tmp/wasmpool-target/tmp/python-p2/app.wasm}
WASMPOOL_CACHE_DIR=${WASMPOOL_CACHE_DIR:-$HOME/.cache/wasmpool}

tmp=$(mktemp -d /tmp/wasmpool-nginx-test-XXXXXX)
master=

cleanup() {
    if [ -n "$master" ] && kill -0 "$master" 2>/dev/null; then
        kill -QUIT "$master" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$master" 2>/dev/null || break; sleep 0.2; done
        kill -TERM "$master" 2>/dev/null
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    if [ -f "$tmp/error.log" ]; then
        echo "--- error.log (last lines)" >&2
        tail -20 "$tmp/error.log" >&2
    fi
    exit 1
}

ok() { echo "ok $*"; }

# --- the library, under its SONAME in a directory of our own

lib=${WASMPOOL_LIB_DIR:-}
if [ -z "$lib" ]; then
    for d in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/release" "$CARGO_TARGET_DIR/debug"} \
             /var/tmp/wasmpool-target/release /var/tmp/wasmpool-target/debug \
             "$repo/target/release" "$repo/target/debug"; do
        if [ -e "$d/libwasmpool.so" ]; then lib=$d; break; fi
    done
fi
[ -n "$lib" ] && [ -e "$lib/libwasmpool.so" -o -e "$lib/libwasmpool.so.0" ] \
    || fail "no libwasmpool.so found (set WASMPOOL_LIB_DIR)"
so=$lib/libwasmpool.so.0
[ -e "$so" ] || so=$lib/libwasmpool.so
mkdir -p "$tmp/lib"
ln -s "$(readlink -f "$so")" "$tmp/lib/libwasmpool.so.0"
ln -s libwasmpool.so.0 "$tmp/lib/libwasmpool.so"

# --- build

module=$(WASMPOOL_LIB_DIR=$tmp/lib BUILD_DIR=$tmp/build "$here/build.sh" | tail -1) \
    || fail "build.sh failed"
[ -f "$module" ] || fail "build.sh printed no module ($module)"
ok "built $module"

# --- configuration

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
have_python=0
[ -f "$PYTHON_WASM" ] && have_python=1
# In the test suite the guest must be there: no check is skipped silently.
if [ "${REQUIRE_PYTHON:-0}" = 1 ] && [ "$have_python" = 0 ]; then
    fail "no python guest at $PYTHON_WASM"
fi

# nginx.conf with $1 inserted in the server block
write_conf() {
    cat <<EOF
load_module $module;
user $(id -un) $(id -gn);
master_process on;
worker_processes ${WORKERS:-2};
pid $tmp/nginx.pid;
error_log $tmp/error.log ${LOG_LEVEL:-info};
events { worker_connections 256; }
http {
    log_format wp '\$request \$status instance=\$wasmpool_instance reused=\$wasmpool_reused';
    access_log $tmp/access.log wp;
    client_body_temp_path $tmp/body;
    client_max_body_size 8m;
    wasmpool_cache_dir $WASMPOOL_CACHE_DIR;
    server {
        listen 127.0.0.1:$port;
        location / {
            wasmpool_component $HELLO;
        }
$1
    }
}
EOF
}

python_location=""
if [ "$have_python" = 1 ]; then
    python_location="        location /py/ {
            wasmpool_component $PYTHON_WASM;
            wasmpool_request_timeout 30s;
        }
        location = /echo {
            wasmpool_component $PYTHON_WASM;
            wasmpool_request_timeout 30s;
        }
        location /big/ {
            wasmpool_component $PYTHON_WASM;
            wasmpool_request_timeout 30s;
        }"
fi

mkdir -p "$tmp/body"
write_conf "$python_location" >"$tmp/nginx.conf"

# --- nginx -t: the good config, then bad ones

"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -t >"$tmp/t.out" 2>&1 \
    || { cat "$tmp/t.out" >&2; fail "nginx -t on the test config"; }
ok "nginx -t accepts the test config"

expect_t_failure() {  # NAME EXTRA-LOCATION PATTERN
    write_conf "$2" >"$tmp/bad.conf"
    if "$NGINX" -p "$tmp" -c "$tmp/bad.conf" -t >"$tmp/t.out" 2>&1; then
        fail "nginx -t accepted $1"
    fi
    grep -q -- "$3" "$tmp/t.out" \
        || { cat "$tmp/t.out" >&2; fail "nginx -t for $1 did not say: $3"; }
    ok "nginx -t fails for $1: $(grep -m1 emerg "$tmp/t.out")"
}

expect_t_failure "a missing component" \
    "        location /missing { wasmpool_component $tmp/missing.wasm; }" \
    "wasmpool_component \"$tmp/missing.wasm\" cannot be read"
expect_t_failure "wasmpool_max_instance_reuse_count 0" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_max_instance_reuse_count 0; }" \
    "value must be between 1 and"
expect_t_failure "wasmpool_request_timeout 0" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_request_timeout 0; }" \
    "value must be greater than 0"
expect_t_failure "wasmpool_memory_budget lots" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_memory_budget lots; }" \
    "invalid wasmpool_memory_budget \"lots\""
expect_t_failure "wasmpool_engine_threads -1" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_engine_threads -1; }" \
    "invalid number"

# --- start

"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" >"$tmp/start.out" 2>&1 \
    || { cat "$tmp/start.out" >&2; fail "nginx did not start"; }
for _ in $(seq 50); do [ -s "$tmp/nginx.pid" ] && break; sleep 0.1; done
master=$(cat "$tmp/nginx.pid" 2>/dev/null) || fail "no pid file"

# every worker loads every component (python: from the compile cache, or
# compiled, which takes a while)
want=2
[ "$have_python" = 1 ] && want=4
for _ in $(seq 600); do
    grep -q 'cannot load component' "$tmp/error.log" && fail "a component did not load"
    [ "$(grep -c 'wasmpool: component .* loaded' "$tmp/error.log")" -ge "$want" ] && break
    sleep 0.5
done
[ "$(grep -c 'wasmpool: component .* loaded' "$tmp/error.log")" -ge "$want" ] \
    || fail "the workers did not load the components"
ok "nginx started, $want component handlers loaded (2 workers)"

url=http://127.0.0.1:$port

# --- hello

code=$(curl -sS -o "$tmp/hello.out" -w '%{http_code}' "$url/") || fail "GET /"
[ "$code" = 200 ] || fail "GET / gave $code"
printf 'Hello from wasmpool!\n' | cmp -s - "$tmp/hello.out" \
    || fail "GET / body: $(od -c "$tmp/hello.out" | head -3)"
ok "GET / -> 200 \"Hello from wasmpool!\\n\""

curl -sS -v -o "$tmp/ka.out" "$url/a" -o "$tmp/ka2.out" "$url/b" 2>"$tmp/ka.err" \
    || fail "keep-alive requests"
grep -q 'Re-using existing connection' "$tmp/ka.err" || fail "the connection was not reused"
[ "$(grep -c '^< HTTP/1.1 200' "$tmp/ka.err")" = 2 ] || fail "keep-alive: not two 200s"
cmp -s "$tmp/hello.out" "$tmp/ka.out" && cmp -s "$tmp/hello.out" "$tmp/ka2.out" \
    || fail "keep-alive bodies"
ok "two requests on one HTTP/1.1 keep-alive connection"

code=$(curl -sS -I -o "$tmp/head.out" -w '%{http_code}' "$url/") || fail "HEAD /"
[ "$code" = 200 ] || fail "HEAD / gave $code"
ok "HEAD / -> 200"

grep -Eq '^GET / HTTP/1.1 200 instance=[1-9][0-9]* reused=[01]$' "$tmp/access.log" \
    || fail "access log: $(tail -1 "$tmp/access.log")"
ok "\$wasmpool_instance and \$wasmpool_reused in the access log: $(grep -m1 '^GET / ' "$tmp/access.log")"

# reload: new workers load the components again and serve
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -s reload 2>/dev/null || fail "nginx -s reload"
for _ in $(seq 600); do
    [ "$(grep -c 'wasmpool: component .* loaded' "$tmp/error.log")" -ge $((want * 2)) ] && break
    sleep 0.5
done
[ "$(grep -c 'wasmpool: component .* loaded' "$tmp/error.log")" -ge $((want * 2)) ] \
    || fail "the new workers did not load the components after reload"
sleep 0.5
code=$(curl -sS -o "$tmp/hello2.out" -w '%{http_code}' "$url/") || fail "GET / after reload"
[ "$code" = 200 ] && cmp -s "$tmp/hello.out" "$tmp/hello2.out" || fail "GET / after reload gave $code"
ok "nginx -s reload: new workers loaded the components, GET / -> 200"

if [ "$have_python" = 1 ]; then
    head -c 1048576 /dev/urandom >"$tmp/body.bin"

    code=$(curl -sS -o "$tmp/echo.out" -w '%{http_code}' --data-binary @"$tmp/body.bin" \
           -H 'Content-Type: application/octet-stream' "$url/echo") || fail "POST /echo"
    [ "$code" = 200 ] || fail "POST /echo gave $code"
    cmp -s "$tmp/body.bin" "$tmp/echo.out" || fail "POST /echo: the body came back different"
    ok "POST 1 MiB to /echo (python) comes back identical"

    code=$(curl -sS -o "$tmp/echo2.out" -w '%{http_code}' --data-binary @"$tmp/body.bin" \
           -H 'Transfer-Encoding: chunked' "$url/echo") || fail "chunked POST /echo"
    [ "$code" = 200 ] || fail "chunked POST /echo gave $code"
    cmp -s "$tmp/body.bin" "$tmp/echo2.out" || fail "chunked POST /echo: different body"
    ok "chunked POST 1 MiB to /echo comes back identical"

    # a client slower than the guest: 16 MB at 4 MB/s (the socket buffers
    # fill, nginx waits for write events)
    code=$(curl -sS -o "$tmp/big.out" -w '%{http_code}' --limit-rate 4M "$url/big/16000000") \
        || fail "GET /big/16000000"
    [ "$code" = 200 ] || fail "GET /big gave $code"
    [ "$(stat -c %s "$tmp/big.out")" = 16000000 ] && [ "$(tr -d x <"$tmp/big.out" | wc -c)" = 0 ] \
        || fail "GET /big: wrong body"
    ok "GET /big/16000000 with a rate-limited client: 16000000 bytes"

    # clients that go away mid-response and mid-upload
    curl -sS -o /dev/null --limit-rate 1M --max-time 1 "$url/big/16000000" 2>/dev/null
    curl -sS -o /dev/null --limit-rate 200k --max-time 1 --data-binary @"$tmp/body.bin" \
        "$url/echo" 2>/dev/null
    sleep 0.5
    grep -q 'client prematurely closed connection' "$tmp/error.log" \
        || fail "no aborted request was logged"
    code=$(curl -sS -o /dev/null -w '%{http_code}' "$url/py/") || fail "GET /py/ after aborts"
    [ "$code" = 200 ] || fail "GET /py/ after aborts gave $code"
    ok "clients that went away were logged and the workers serve on"

    # a graceful stop lets a running response finish
    curl -sS -o "$tmp/quit.out" -D "$tmp/quit.head" --limit-rate 1M "$url/big/8000000" 2>"$tmp/quit.err" &
    curl_pid=$!
    sleep 1
fi

# --- stop

"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -s quit 2>"$tmp/signal.out" || fail "nginx -s quit"
if [ "$have_python" = 1 ]; then
    wait "$curl_pid"
    rc=$?
    size=$(stat -c %s "$tmp/quit.out" 2>/dev/null)
    [ "$rc" = 0 ] && [ "$size" = 8000000 ] \
        || fail "the response running at quit: curl rc $rc, $size bytes: $(cat "$tmp/quit.err" "$tmp/quit.head"; head -c 300 "$tmp/quit.out")"
    ok "a response running at nginx -s quit completed (8000000 bytes)"
fi
for _ in $(seq 100); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
kill -0 "$master" 2>/dev/null && fail "nginx did not stop within 10 s of nginx -s quit"
if grep -E '\[(alert|crit|emerg)\]' "$tmp/error.log"; then
    fail "alerts in the error log"
fi
grep -q 'exit$' "$tmp/error.log" || fail "no exit in the error log"
master=
ok "nginx -s quit stopped nginx cleanly (no alerts)"

# --- overload: one worker, one request at a time, no queue

if [ "$have_python" = 1 ]; then
    WORKERS=1 write_conf "        location = /echo {
            wasmpool_component $PYTHON_WASM;
            wasmpool_max_concurrent_requests 1;
            wasmpool_max_queued_requests 0;
        }
        location /py/ {
            wasmpool_component $PYTHON_WASM;
            wasmpool_max_concurrent_requests 1;
            wasmpool_max_queued_requests 0;
        }" >"$tmp/one.conf"
    : >"$tmp/error.log"
    rm -f "$tmp/nginx.pid"
    "$NGINX" -p "$tmp" -c "$tmp/one.conf" >"$tmp/start.out" 2>&1 \
        || { cat "$tmp/start.out" >&2; fail "nginx (one worker) did not start"; }
    for _ in $(seq 50); do [ -s "$tmp/nginx.pid" ] && break; sleep 0.1; done
    master=$(cat "$tmp/nginx.pid" 2>/dev/null) || fail "no pid file"
    for _ in $(seq 600); do
        [ "$(grep -c 'wasmpool: component .* loaded' "$tmp/error.log")" -ge 2 ] && break
        sleep 0.5
    done
    # a slow upload holds the only slot while a second request comes
    curl -sS -o /dev/null -w '%{http_code}' --limit-rate 300k --data-binary @"$tmp/body.bin" \
        "$url/echo" >"$tmp/slow.code" 2>&1 &
    curl_pid=$!
    sleep 1
    curl -sS -D "$tmp/503.head" -o /dev/null "$url/py/" || fail "GET /py/ while busy"
    wait "$curl_pid"
    grep -q '^HTTP/1.1 503' "$tmp/503.head" || fail "not a 503 while busy: $(head -1 "$tmp/503.head")"
    grep -qi '^Retry-After: 1' "$tmp/503.head" || fail "no Retry-After: 1 on the 503"
    grep -q '\[error\].*wasmpool: overloaded' "$tmp/error.log" || fail "the 503 was not logged"
    [ "$(cat "$tmp/slow.code")" = 200 ] || fail "the slow upload gave $(cat "$tmp/slow.code")"
    ok "overloaded (1 concurrent, 0 queued): 503 with Retry-After: 1, logged; the busy request 200"
    "$NGINX" -p "$tmp" -c "$tmp/one.conf" -s quit 2>/dev/null || fail "nginx -s quit (one worker)"
    for _ in $(seq 100); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$master" 2>/dev/null && fail "nginx (one worker) did not stop"
    master=
    ok "nginx (one worker) stopped"
fi
