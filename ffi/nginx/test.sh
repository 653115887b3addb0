#!/bin/bash
# Test of ngx_http_wasmpool_module against the installed nginx: builds it
# (build.sh), runs nginx with it on 127.0.0.1 (workers as www-data when run
# as root) and checks, with curl, slowhttptest and a small load generator:
# nginx -t on good and bad configurations, HTTP/1.1, h2c and HTTP/2 over
# TLS, wasmpool_config, the variables, guest output in the error log,
# 503/504/500/413, 1 GiB up and down through a streaming guest with the
# worker's RSS bounded, clients that go away, slow clients, reload and quit
# under load, overload, and a short run under valgrind.
# Prints "ok ..." per check; exits non-zero on the first failure.
#
# Environment:
#   WASMPOOL_LIB_DIR   directory with libwasmpool.so (default: the first of
#                      $CARGO_TARGET_DIR, /var/tmp/wasmpool-target, <repo>/target
#                      {release,debug} that has one)
#   WASMPOOL_CACHE_DIR compile cache for the workers (default
#                      /var/tmp/wasmpool-nginx-test-cache)
#   PYTHON_WASM        python guest with /echo and /big/N (default
#                      /var/tmp/wasmpool-target/tmp/python-p2/app.wasm)
#   SUITE_WASM         the WASIp2 suite guest (tests/guests/p2_suite.wat;
#                      default /var/tmp/wasmpool-target/tmp/nginx-guests/p2_suite.wasm,
#                      made by `cargo bench --profile dev --bench guests -- DIR`)
#   REQUIRE_GUESTS=1   fail when a guest is missing (else its checks are
#                      skipped, and said so)
#   VALGRIND=0         leave out the valgrind run (default: run it when
#                      valgrind is installed; REQUIRE_GUESTS=1 requires it)
#   VALGRIND_LIB_DIR   libwasmpool for the valgrind run (default: the one
#                      above; a debug build: memcheck misreads optimized
#                      code in wasmparser)
#   NGINX              nginx binary (default /usr/sbin/nginx)
#   KEEP=1             keep the temporary directory
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
NGINX=${NGINX:-/usr/sbin/nginx}
PYTHON_WASM=${PYTHON_WASM:-/var/tmp/wasmpool-target/tmp/python-p2/app.wasm}
SUITE_WASM=${SUITE_WASM:-/var/tmp/wasmpool-target/tmp/nginx-guests/p2_suite.wasm}
WASMPOOL_CACHE_DIR=${WASMPOOL_CACHE_DIR:-/var/tmp/wasmpool-nginx-test-cache}
REQUIRE_GUESTS=${REQUIRE_GUESTS:-0}

tmp=$(mktemp -d /tmp/wasmpool-nginx-test-XXXXXX)
chmod 755 "$tmp"
master=
bg_pids=()

cleanup() {
    for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null; done
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
skip() {
    [ "$REQUIRE_GUESTS" = 1 ] && fail "required but missing: $*"
    echo "SKIPPED $*"
}

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
cp "$(readlink -f "$so")" "$tmp/lib/libwasmpool.so.0"
ln -s libwasmpool.so.0 "$tmp/lib/libwasmpool.so"

# --- build

module=$(WASMPOOL_LIB_DIR=$tmp/lib BUILD_DIR=$tmp/build "$here/build.sh" | tail -1) \
    || fail "build.sh failed"
[ -f "$module" ] || fail "build.sh printed no module ($module)"
chmod -R a+rX "$tmp/lib" "$tmp/build"
ok "built $module"

# --- the workers' user, the guests where it can read them, the cache

if [ "$(id -u)" = 0 ] && id www-data >/dev/null 2>&1; then
    wuser=www-data; wgroup=www-data
else
    wuser=$(id -un); wgroup=$(id -gn)
fi
mkdir -p "$WASMPOOL_CACHE_DIR" "$tmp/guests" "$tmp/app" "$tmp/filecache" "$tmp/body"
chown "$wuser:$wgroup" "$WASMPOOL_CACHE_DIR" "$tmp/filecache" "$tmp/body"
HELLO=$tmp/guests/hello.wasm
cp "$repo/examples/hello.wasm" "$HELLO"
cp "$repo/examples/hello.wasm" "$tmp/app/hello.wasm"
have_python=0
if [ -f "$PYTHON_WASM" ]; then
    cp "$PYTHON_WASM" "$tmp/guests/python.wasm"; PYTHON_WASM=$tmp/guests/python.wasm; have_python=1
else
    skip "the python guest ($PYTHON_WASM)"
fi
have_suite=0
if [ -f "$SUITE_WASM" ]; then
    cp "$SUITE_WASM" "$tmp/guests/suite.wasm"; SUITE_WASM=$tmp/guests/suite.wasm; have_suite=1
else
    skip "the suite guest ($SUITE_WASM)"
fi
chmod -R a+rX "$tmp/guests" "$tmp/app"

# the server's config file, for wasmpool_config
cat >"$tmp/app/wasmpool.toml" <<EOF
# the same file wasmpool serve --config reads
component = "hello.wasm"
listen = ["127.0.0.1:8080"]
cache-dir = "$tmp/filecache"
max-instance-reuse-count = 50
request-timeout = "5s"
EOF

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port); h2port=$(free_port); tlsport=$(free_port); sport=$(free_port)
url=http://127.0.0.1:$port
h2url=http://127.0.0.1:$h2port
tlsurl=https://127.0.0.1:$tlsport
surl=http://127.0.0.1:$sport

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/key.pem" -out "$tmp/cert.pem" \
    -days 2 -subj /CN=localhost >/dev/null 2>&1 || fail "openssl could not make a certificate"

# the locations of the three hello servers (HTTP/1.1, h2c, TLS)
{
    echo "        location / {
            wasmpool_component $HELLO;
            wasmpool_max_instance_reuse_count 100;
        }
        location /cfg/ {
            wasmpool_config $tmp/app/wasmpool.toml;
        }
        location /noinline/ {
            wasmpool_component $HELLO;
            wasmpool_inline off;
        }"
    if [ "$have_python" = 1 ]; then
        echo "        location /py/ {
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
    if [ "$have_suite" = 1 ]; then
        echo "        location = /trailers {
            wasmpool_component $SUITE_WASM;
        }"
    fi
} >"$tmp/locations.conf"

# nginx.conf with $1 inserted in the first server block
write_conf() {
    cat <<EOF
load_module $module;
user $wuser $wgroup;
master_process on;
worker_processes ${WORKERS:-2};
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
events { worker_connections 512; }
http {
    log_format wp '\$request \$status instance=\$wasmpool_instance reused=\$wasmpool_reused pid=\$pid';
    access_log $tmp/access.log wp;
    client_body_temp_path $tmp/body;
    client_max_body_size 8m;
    client_header_timeout 5s;
    client_body_timeout 5s;
    send_timeout 5s;
    wasmpool_cache_dir $WASMPOOL_CACHE_DIR;
    server {
        listen 127.0.0.1:$port;
        include $tmp/locations.conf;
$1
    }
    server {
        listen 127.0.0.1:$h2port http2;
        include $tmp/locations.conf;
    }
    server {
        listen 127.0.0.1:$tlsport ssl http2;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        include $tmp/locations.conf;
    }
$( [ "$have_suite" = 1 ] && echo "    server {
        listen 127.0.0.1:$sport;
        client_max_body_size 0;
        location / {
            wasmpool_component $SUITE_WASM;
            wasmpool_max_instance_reuse_count 100;
            # a WASIp2 guest's whole call (1 GiB through it) is in it
            wasmpool_request_timeout 300s;
        }
        location /sleep/ {
            wasmpool_component $SUITE_WASM;
            wasmpool_request_timeout 2s;
        }
    }" )
}
EOF
}

write_conf "" >"$tmp/nginx.conf"

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
    grep -q 'test failed' "$tmp/t.out" || fail "nginx -t for $1: no 'test failed'"
    ok "nginx -t fails for $1: $(grep -m1 emerg "$tmp/t.out" | sed 's/^.*\[emerg\] [0-9#]*: //')"
}

printf 'not wasm at all\n' >"$tmp/text.wasm"
printf 'max-instance-reuse-count = \n' >"$tmp/syntax.toml"
printf '# knobs\nmax-instance-reuse-count = 0\n' >"$tmp/zero.toml"
printf 'request-timeout = "5s"\n' >"$tmp/nocomp.toml"
printf 'component = "missing.wasm"\n' >"$tmp/missingcomp.toml"
chmod a+r "$tmp"/*.toml "$tmp/text.wasm"

expect_t_failure "a missing component" \
    "        location /missing { wasmpool_component $tmp/missing.wasm; }" \
    "wasmpool_component \"$tmp/missing.wasm\" cannot be read"
expect_t_failure "a file that is not a component" \
    "        location /text { wasmpool_component $tmp/text.wasm; }" \
    "component \"$tmp/text.wasm\" does not load: .*not a WebAssembly component"
expect_t_failure "wasmpool_max_instance_reuse_count 0" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_max_instance_reuse_count 0; }" \
    "value must be between 1 and"
expect_t_failure "wasmpool_request_timeout 0" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_request_timeout 0; }" \
    "value must be greater than 0"
expect_t_failure "wasmpool_memory_budget lots" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_memory_budget lots; }" \
    "invalid wasmpool_memory_budget \"lots\""
expect_t_failure "a memory budget larger than the machine" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_memory_budget 1000000g; }" \
    "more than this process may use"
expect_t_failure "wasmpool_engine_threads -1" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_engine_threads -1; }" \
    "invalid number"
expect_t_failure "wasmpool_inline maybe" \
    "        location /bad { wasmpool_component $HELLO; wasmpool_inline maybe; }" \
    "invalid value \"maybe\""
expect_t_failure "a config file with a syntax error" \
    "        location /bad { wasmpool_config $tmp/syntax.toml; wasmpool_component $HELLO; }" \
    "syntax.toml.*line 1"
expect_t_failure "a config file with an invalid value" \
    "        location /bad { wasmpool_config $tmp/zero.toml; wasmpool_component $HELLO; }" \
    "zero.toml.*line 2.*max-instance-reuse-count"
expect_t_failure "a config file that names no component" \
    "        location /bad { wasmpool_config $tmp/nocomp.toml; }" \
    "names no component"
expect_t_failure "a config file whose component is missing" \
    "        location /bad { wasmpool_config $tmp/missingcomp.toml; }" \
    "missing.wasm"
expect_t_failure "a missing config file" \
    "        location /bad { wasmpool_config $tmp/nope.toml; }" \
    "nope.toml"

# --- start

start_nginx() {  # CONF WANT-LOADED
    : >"$tmp/error.log"
    rm -f "$tmp/nginx.pid"
    "$NGINX" -p "$tmp" -c "$1" >"$tmp/start.out" 2>&1 \
        || { cat "$tmp/start.out" >&2; fail "nginx did not start"; }
    for _ in $(seq 50); do [ -s "$tmp/nginx.pid" ] && break; sleep 0.1; done
    master=$(cat "$tmp/nginx.pid" 2>/dev/null) || fail "no pid file"
    wait_loaded "$2"
}

loaded() { grep -c 'wasmpool: component .* loaded' "$tmp/error.log"; }

wait_loaded() {  # N
    for _ in $(seq 600); do
        grep -q 'cannot load component' "$tmp/error.log" && fail "a component did not load"
        [ "$(loaded)" -ge "$1" ] && return 0
        sleep 0.5
    done
    fail "the workers did not load the components ($(loaded) of $1)"
}

workers() { pgrep -P "$master" | tr '\n' ' '; }

# KiB of a process's /proc status field
status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

components=3
[ "$have_python" = 1 ] && components=$((components + 1))
[ "$have_suite" = 1 ] && components=$((components + 3))
want=$((components * 2))
start_nginx "$tmp/nginx.conf" "$want"
for w in $(workers); do
    [ "$(stat -c %U "/proc/$w")" = "$wuser" ] || fail "worker $w does not run as $wuser"
done
ok "nginx started, $components components loaded by each of 2 workers (as $wuser)"

# --- hello over HTTP/1.1

code=$(curl -sS -o "$tmp/hello.out" -w '%{http_code}' "$url/") || fail "GET /"
[ "$code" = 200 ] || fail "GET / gave $code"
printf 'Hello from wasmpool!\n' | cmp -s - "$tmp/hello.out" \
    || fail "GET / body: $(od -c "$tmp/hello.out" | head -3)"
ok "GET / -> 200 \"Hello from wasmpool!\\n\""

# the same through engine threads (wasmpool_inline off)
for i in 1 2 3; do
    code=$(curl -sS -o "$tmp/noinline.out" -w '%{http_code}' "$url/noinline/$i") || fail "GET /noinline/"
    [ "$code" = 200 ] && cmp -s "$tmp/hello.out" "$tmp/noinline.out" || fail "GET /noinline/$i gave $code"
done
ok "GET /noinline/ (wasmpool_inline off) -> 200, three times"

curl -sS -v -o "$tmp/ka.out" "$url/a" -o "$tmp/ka2.out" "$url/b" -o "$tmp/ka3.out" "$url/c" \
    2>"$tmp/ka.err" || fail "keep-alive requests"
grep -q 'Re-using existing connection' "$tmp/ka.err" || fail "the connection was not reused"
[ "$(grep -c '^< HTTP/1.1 200' "$tmp/ka.err")" = 3 ] || fail "keep-alive: not three 200s"
cmp -s "$tmp/hello.out" "$tmp/ka.out" && cmp -s "$tmp/hello.out" "$tmp/ka3.out" \
    || fail "keep-alive bodies"
ok "three requests on one HTTP/1.1 keep-alive connection"

code=$(curl -sS -I -o "$tmp/head.out" -w '%{http_code}' "$url/") || fail "HEAD /"
[ "$code" = 200 ] || fail "HEAD / gave $code"
ok "HEAD / -> 200"

grep -Eq '^GET /c HTTP/1.1 200 instance=[1-9][0-9]* reused=1 ' "$tmp/access.log" \
    || fail "access log: $(cat "$tmp/access.log")"
grep -Eq '^GET / HTTP/1.1 200 instance=[1-9][0-9]* reused=[01] ' "$tmp/access.log" \
    || fail "access log: $(cat "$tmp/access.log")"
ok "\$wasmpool_instance, \$wasmpool_reused in the access log: $(grep -m1 '^GET /c ' "$tmp/access.log")"

# --- wasmpool_config: the server's file serves a location

code=$(curl -sS -o "$tmp/cfg.out" -w '%{http_code}' "$url/cfg/") || fail "GET /cfg/"
[ "$code" = 200 ] && cmp -s "$tmp/hello.out" "$tmp/cfg.out" || fail "GET /cfg/ gave $code"
ls "$tmp/filecache" | grep -q '\.cwasm$' || fail "no compile cache entry in the file's cache-dir"
[ "$(stat -c %U "$(ls -d "$tmp"/filecache/*.cwasm | head -1)")" = "$wuser" ] \
    || fail "the cache entry is not the workers' ($wuser)"
ok "wasmpool_config: the file's component served, compiled into its cache-dir (owned by $wuser)"

# --- HTTP/2: h2c and TLS

v=$(curl -sS --http2-prior-knowledge -o "$tmp/h2.out" -w '%{http_code} %{http_version}' "$h2url/") \
    || fail "h2c GET /"
[ "$v" = "200 2" ] && cmp -s "$tmp/hello.out" "$tmp/h2.out" || fail "h2c GET / gave $v"
ok "h2c: GET / -> 200 over HTTP/2"
v=$(curl -sS -k --http2 -o "$tmp/tls.out" -w '%{http_code} %{http_version}' "$tlsurl/") \
    || fail "TLS GET /"
[ "$v" = "200 2" ] && cmp -s "$tmp/hello.out" "$tmp/tls.out" || fail "TLS GET / gave $v"
ok "TLS (generated certificate): GET / -> 200 over HTTP/2 (ALPN h2)"

# --- the guest's trailers: on a chunked HTTP/1.1 response, and over HTTP/2

if [ "$have_suite" = 1 ]; then
    curl -sS --raw -H 'TE: trailers' -o "$tmp/tr1.out" "$url/trailers" || fail "GET /trailers"
    grep -q 'with trailers' "$tmp/tr1.out" && grep -qi '^x-checksum: c0ffee' "$tmp/tr1.out" \
        || fail "HTTP/1.1 trailers: $(od -c "$tmp/tr1.out" | head -8)"
    for u in "--http2-prior-knowledge $h2url" "-k --http2 $tlsurl"; do
        # shellcheck disable=SC2086
        v=$(curl -sS $u/trailers -D "$tmp/tr2.hdr" -o "$tmp/tr2.out" -w '%{http_version}') \
            || fail "h2 GET /trailers"
        [ "$v" = 2 ] && grep -q 'with trailers' "$tmp/tr2.out" \
            && grep -qi '^x-checksum: c0ffee' "$tmp/tr2.hdr" \
            || fail "HTTP/2 trailers ($u): $v $(cat "$tmp/tr2.hdr")"
    done
    ok "the guest's trailers reach the client: chunked HTTP/1.1, h2c and TLS h2"
else
    skip "trailers: no suite guest"
fi

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

    for u in "$h2url" "$tlsurl"; do
        v=$(curl -sS -k --http2-prior-knowledge -o "$tmp/echo3.out" -w '%{http_code} %{http_version}' \
            --data-binary @"$tmp/body.bin" "$u/echo" 2>/dev/null) \
        || v=$(curl -sS -k --http2 -o "$tmp/echo3.out" -w '%{http_code} %{http_version}' \
            --data-binary @"$tmp/body.bin" "$u/echo") || fail "h2 POST /echo ($u)"
        [ "$v" = "200 2" ] && cmp -s "$tmp/body.bin" "$tmp/echo3.out" || fail "h2 POST /echo ($u) gave $v"
    done
    ok "POST 1 MiB to /echo over h2c and over TLS h2 comes back identical"

    head -c 9000000 /dev/zero >"$tmp/toolarge.bin"
    code=$(curl -sS -o /dev/null -w '%{http_code}' --data-binary @"$tmp/toolarge.bin" "$url/echo")
    [ "$code" = 413 ] || fail "9 MB over client_max_body_size 8m gave $code"
    ok "a body over client_max_body_size -> 413"

    # a client slower than the guest: 16 MB at 4 MB/s
    code=$(curl -sS -o "$tmp/big.out" -w '%{http_code}' --limit-rate 4M "$url/big/16000000") \
        || fail "GET /big/16000000"
    [ "$code" = 200 ] || fail "GET /big gave $code"
    [ "$(stat -c %s "$tmp/big.out")" = 16000000 ] && [ "$(tr -d x <"$tmp/big.out" | wc -c)" = 0 ] \
        || fail "GET /big: wrong body"
    ok "GET /big/16000000 with a rate-limited client: 16000000 bytes"
fi

# --- the suite guest: errors, guest output, 1 GiB each way, aborts

cpu_ticks() {  # utime + stime of the workers
    local t=0
    for w in $(workers); do
        t=$((t + $(awk '{ print $14 + $15 }' "/proc/$w/stat")))
    done
    echo "$t"
}

if [ "$have_suite" = 1 ]; then
    code=$(curl -sS -o /dev/null -w '%{http_code}' "$surl/sleep/6000")
    [ "$code" = 504 ] || fail "a guest slower than wasmpool_request_timeout gave $code"
    grep -q '\[error\].*wasmpool: timeout' "$tmp/error.log" || fail "the 504 was not logged"
    ok "a guest past wasmpool_request_timeout (2s) -> 504, logged"

    code=$(curl -sS -o /dev/null -w '%{http_code}' "$surl/trap")
    [ "$code" = 500 ] || fail "a trapping guest gave $code"
    grep -q '\[error\].*wasmpool: guest trapped' "$tmp/error.log" || fail "the trap was not logged"
    code=$(curl -sS -o /dev/null -w '%{http_code}' "$surl/")
    [ "$code" = 200 ] || fail "after a trap: $code"
    ok "a trapping guest -> 500, logged; the next request 200"

    code=$(curl -sS -o /dev/null -w '%{http_code}' "$surl/log")
    [ "$code" = 200 ] || fail "GET /log gave $code"
    for _ in $(seq 20); do
        grep -q '\[info\].*wasmpool: guest instance=[0-9]* stream=stdout: guest log line from p2' \
            "$tmp/error.log" && break
        sleep 0.1
    done
    grep -q '\[info\].*wasmpool: guest instance=[0-9]* stream=stdout: guest log line from p2' \
        "$tmp/error.log" || fail "the guest's stdout line is not in the error log"
    ok "guest stdout in the error log at info: $(grep -m1 'guest log line' "$tmp/error.log" | sed 's/^.*\[info\] [0-9#]*: //')"

    # 1 GiB each way, streamed: the workers' peak RSS stays near where it was
    hwm_before=0
    for w in $(workers); do
        h=$(status_kib "$w" VmHWM); [ "$h" -gt "$hwm_before" ] && hwm_before=$h
    done
    gib=1073741824
    n=$(head -c $gib /dev/zero | curl -sS -T - -H 'Content-Type: application/octet-stream' \
        "$surl/echo" | wc -c)
    [ "$n" -gt "$gib" ] && [ "$n" -lt $((gib + 4096)) ] || fail "1 GiB upload echoed $n bytes"
    n=$(curl -sS "$surl/zeros/$gib" | wc -c)
    [ "$n" = "$gib" ] || fail "1 GiB download gave $n bytes"
    hwm_after=0
    for w in $(workers); do
        h=$(status_kib "$w" VmHWM); [ "$h" -gt "$hwm_after" ] && hwm_after=$h
    done
    [ $((hwm_after - hwm_before)) -lt 65536 ] \
        || fail "a worker's peak RSS grew by $(((hwm_after - hwm_before) / 1024)) MiB moving 1 GiB"
    ok "1 GiB up (echoed back) and 1 GiB down: worker peak RSS $((hwm_before / 1024)) -> $((hwm_after / 1024)) MiB"

    # clients that go away mid-upload and mid-download: the guest stops
    rss_before=0
    for w in $(workers); do rss_before=$((rss_before + $(status_kib "$w" VmRSS))); done
    for _ in $(seq 10); do
        curl -sS -o /dev/null --limit-rate 20M --max-time 0.5 "$surl/zeros/$gib" 2>/dev/null
        head -c $gib /dev/zero | curl -sS -o /dev/null --limit-rate 20M --max-time 0.5 -T - \
            "$surl/echo" 2>/dev/null
    done
    sleep 0.5
    t0=$(cpu_ticks); sleep 1; t1=$(cpu_ticks)
    [ $((t1 - t0)) -le 10 ] || fail "the workers used $((t1 - t0)) ticks in the second after the aborts"
    grep -q 'client prematurely closed connection' "$tmp/error.log" \
        || fail "no aborted request was logged"
    rss_after=0
    for w in $(workers); do rss_after=$((rss_after + $(status_kib "$w" VmRSS))); done
    [ $((rss_after - rss_before)) -lt 32768 ] \
        || fail "the workers' RSS grew by $(((rss_after - rss_before) / 1024)) MiB over 20 aborts"
    code=$(curl -sS -o /dev/null -w '%{http_code}' "$surl/") || fail "GET / after aborts"
    [ "$code" = 200 ] || fail "GET / after aborts gave $code"
    ok "20 clients gone mid-upload/mid-download: logged, workers idle after ($((t1 - t0)) ticks in 1 s), RSS $((rss_before / 1024)) -> $((rss_after / 1024)) MiB, next request 200"
fi

# --- slow clients: slowhttptest's four modes; nginx stays available

if command -v slowhttptest >/dev/null; then
    for mode in "-H" "-B" "-X -w 512 -y 1024 -n 5 -z 32 -k 3" "-R"; do
        # shellcheck disable=SC2086
        slowhttptest $mode -c 200 -r 100 -l 8 -i 2 -x 10 -p 3 -t POST -u "$url/" \
            >"$tmp/slow.out" 2>&1 &
        sp=$!
        bg_pids+=("$sp")
        sleep 4
        code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 3 "$url/") || code=none
        [ "$code" = 200 ] || fail "under slowhttptest $mode: GET / gave $code"
        wait "$sp"
    done
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 3 "$url/") || code=none
    [ "$code" = 200 ] || fail "after slowhttptest: GET / gave $code"
    ok "slowhttptest slowloris, slow body, slow read and range (200 connections each): GET / 200 during and after"
else
    skip "slowhttptest is not installed"
fi

# --- reload under load: no failed request

cat >"$tmp/load.py" <<'EOF'
# Keep-alive GETs from THREADS threads for SECONDS, over the URLs given.
# A request that fails on a kept-alive connection before any byte of its
# response came (the server closed that idle connection: what every HTTP
# client retries) is sent again on a new connection; anything else that is
# not a 200 is a failure. Prints "requests failures".
import http.client, sys, threading, time, urllib.parse
threads, seconds, urls = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
done = [0]; failed = [0]; lock = threading.Lock(); end = time.time() + seconds
def worker(i):
    u = urllib.parse.urlsplit(urls[i % len(urls)])
    conn, used = None, False
    while time.time() < end:
        for attempt in (0, 1):
            if conn is None:
                conn, used = http.client.HTTPConnection(u.hostname, u.port, timeout=30), False
            try:
                conn.request("GET", u.path)
                r = conn.getresponse(); r.read()
                ok = r.status == 200
                used = True
                if r.getheader("connection", "").lower() == "close":
                    conn.close(); conn = None
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close(); conn = None
                if used and attempt == 0:
                    continue
                ok = False
                break
            except Exception:
                conn.close(); conn = None; ok = False
                break
        with lock:
            done[0] += 1
            failed[0] += 0 if ok else 1
ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(done[0], failed[0])
EOF

load_urls=("$url/")
[ "$have_python" = 1 ] && load_urls+=("$url/py/")
[ "$have_suite" = 1 ] && load_urls+=("$surl/sleep/50")
python3 "$tmp/load.py" 8 7 "${load_urls[@]}" >"$tmp/load.out" &
lp=$!
bg_pids+=("$lp")
sleep 1.5
n0=$(loaded)
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -s reload 2>/dev/null || fail "nginx -s reload"
wait_loaded $((n0 + want))
sleep 1
n0=$(loaded)
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -s reload 2>/dev/null || fail "nginx -s reload"
wait_loaded $((n0 + want))
wait "$lp"
read -r reqs failures <"$tmp/load.out"
[ "${reqs:-0}" -gt 100 ] || fail "the load made only ${reqs:-0} requests"
[ "$failures" = 0 ] || fail "$failures of $reqs requests failed across two reloads"
grep -E '\[(alert|crit|emerg)\]' "$tmp/error.log" && fail "alerts in the error log"
# the load check filled the compile cache: the new workers compiled nothing
# (libwasmpool's lines reach the error log through the pipe the worker's
# event loop reads: the newest workers' may lag their "loaded" lines)
for _ in $(seq 100); do
    ready=$(grep -c 'wasmpool: component ready .*cache=Hit' "$tmp/error.log")
    [ "$ready" -ge $((want * 3)) ] && break
    sleep 0.1
done
[ "$ready" -ge $((want * 3)) ] || fail "only $ready of $((want * 3)) worker loads came from the compile cache"
grep 'wasmpool: component ready' "$tmp/error.log" | grep -v 'cache=Hit' \
    && fail "a worker compiled a component"
pids=$(grep -o 'pid=[0-9]*' "$tmp/access.log" | sort -u | wc -l)
[ "$pids" -ge 4 ] || fail "the access log shows $pids worker pids (2 workers, 2 reloads: want 4 or more)"
ok "two nginx -s reload under load (8 clients, 7 s): $reqs requests, 0 failed, served by $pids worker processes; all $ready worker loads from the compile cache"

# a reload with a broken component keeps the old configuration serving
cp "$tmp/text.wasm" "$tmp/guests/broken.wasm"
cp "$tmp/nginx.conf" "$tmp/good.conf"
write_conf "        location /broken { wasmpool_component $tmp/guests/broken.wasm; }" >"$tmp/nginx.conf"
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -s reload 2>/dev/null || fail "nginx -s reload (broken)"
for _ in $(seq 100); do grep -q 'broken.wasm" does not load' "$tmp/error.log" && break; sleep 0.1; done
grep -q 'broken.wasm" does not load' "$tmp/error.log" || fail "the broken reload was not refused"
cp "$tmp/good.conf" "$tmp/nginx.conf"
code=$(curl -sS -o /dev/null -w '%{http_code}' "$url/") || fail "GET / after a broken reload"
[ "$code" = 200 ] || fail "GET / after a broken reload gave $code"
[ "$(curl -sS -o /dev/null -w '%{http_code}' "$url/broken")" = 200 ] \
    || fail "the broken location exists: the reload was not refused"
: >"$tmp/error.log"  # its emerg was expected
ok "a reload with a component that does not load is refused; the old workers serve on"

# --- quit under load: running requests finish

if [ "$have_suite" = 1 ]; then
    quit_pids=()
    for i in $(seq 8); do
        curl -sS -o "$tmp/quit$i.out" -w '%{http_code}' "$surl/sleep/1500" >"$tmp/quit$i.code" 2>&1 &
        quit_pids+=($!)
    done
    curl -sS -o "$tmp/quitbig.out" -w '%{http_code}' --limit-rate 4M "$surl/zeros/8000000" \
        >"$tmp/quitbig.code" 2>&1 &
    quit_pids+=($!)
    sleep 0.5
    "$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -s quit 2>/dev/null || fail "nginx -s quit"
    for p in "${quit_pids[@]}"; do wait "$p"; done
    for i in $(seq 8); do
        [ "$(cat "$tmp/quit$i.code")" = 200 ] || fail "request $i running at quit: $(cat "$tmp/quit$i.code")"
    done
    [ "$(cat "$tmp/quitbig.code")" = 200 ] && [ "$(stat -c %s "$tmp/quitbig.out")" = 8000000 ] \
        || fail "the download running at quit: $(cat "$tmp/quitbig.code"), $(stat -c %s "$tmp/quitbig.out") bytes"
    quit_note="8 requests in the guest and an 8 MB download running at quit all completed"
else
    "$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -s quit 2>/dev/null || fail "nginx -s quit"
    quit_note="(no suite guest: no requests in flight)"
fi
for _ in $(seq 100); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
kill -0 "$master" 2>/dev/null && fail "nginx did not stop within 10 s of nginx -s quit"
if grep -E '\[(alert|crit|emerg)\]' "$tmp/error.log"; then
    fail "alerts in the error log"
fi
grep -q 'exit$' "$tmp/error.log" || fail "no exit in the error log"
master=
ok "nginx -s quit: $quit_note; nginx stopped cleanly (no alerts)"

# --- overload: one worker, one request at a time, no queue

if [ "$have_suite" = 1 ]; then
    cat >"$tmp/one.conf" <<EOF
load_module $module;
user $wuser $wgroup;
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
events { worker_connections 64; }
http {
    access_log off;
    wasmpool_cache_dir $WASMPOOL_CACHE_DIR;
    server {
        listen 127.0.0.1:$sport;
        location / {
            wasmpool_component $SUITE_WASM;
            wasmpool_max_concurrent_requests 1;
            wasmpool_max_queued_requests 0;
        }
    }
}
EOF
    start_nginx "$tmp/one.conf" 1
    curl -sS -o /dev/null -w '%{http_code}' "$surl/sleep/1500" >"$tmp/slow.code" 2>&1 &
    curl_pid=$!
    sleep 0.5
    curl -sS -D "$tmp/503.head" -o /dev/null "$surl/" || fail "GET / while busy"
    wait "$curl_pid"
    grep -q '^HTTP/1.1 503' "$tmp/503.head" || fail "not a 503 while busy: $(head -1 "$tmp/503.head")"
    grep -qi '^Retry-After: 1' "$tmp/503.head" || fail "no Retry-After: 1 on the 503"
    grep -q '\[error\].*wasmpool: overloaded' "$tmp/error.log" || fail "the 503 was not logged"
    [ "$(cat "$tmp/slow.code")" = 200 ] || fail "the busy request gave $(cat "$tmp/slow.code")"
    ok "overloaded (1 concurrent, 0 queued): 503 with Retry-After: 1, logged; the busy request 200"
    "$NGINX" -p "$tmp" -c "$tmp/one.conf" -s quit 2>/dev/null || fail "nginx -s quit (one worker)"
    for _ in $(seq 100); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$master" 2>/dev/null && fail "nginx (one worker) did not stop"
    master=
fi

# --- valgrind: master_process off, a short run

if [ "${VALGRIND:-1}" != 0 ] && command -v valgrind >/dev/null; then
    # small pools: valgrind cannot reserve the default's address space
    cat >"$tmp/vg.toml" <<EOF
max-concurrent-requests = 16
max-memory-size = "16MiB"
memory-keep-resident = "256KiB"
EOF
    chmod a+r "$tmp/vg.toml"
    cat >"$tmp/vg.conf" <<EOF
load_module $module;
daemon off;
master_process off;
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
events { worker_connections 64; }
http {
    access_log off;
    wasmpool_cache_dir $tmp/vgcache;
    wasmpool_config $tmp/vg.toml;
    server {
        listen 127.0.0.1:$port;
        location / { wasmpool_component $HELLO; wasmpool_max_instance_reuse_count 4; }
$( [ "$have_suite" = 1 ] && echo "        location /s/ { wasmpool_component $SUITE_WASM; wasmpool_request_timeout 2s; }" )
    }
}
EOF
    : >"$tmp/error.log"
    mkdir -p "$tmp/vglib"
    vlib=${VALGRIND_LIB_DIR:-$lib}
    vso=$vlib/libwasmpool.so.0
    [ -e "$vso" ] || vso=$vlib/libwasmpool.so
    cp "$(readlink -f "$vso")" "$tmp/vglib/libwasmpool.so.0"
    chmod -R a+rX "$tmp/vglib"
    LD_LIBRARY_PATH=$tmp/vglib valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
        --show-leak-kinds=definite --suppressions="$repo/ffi/tests/valgrind.supp" \
        --suppressions="$here/valgrind.supp" \
        --log-file="$tmp/vg.%p.log" "$NGINX" -p "$tmp" -c "$tmp/vg.conf" >"$tmp/vg.out" 2>&1 &
    vp=$!
    bg_pids+=("$vp")
    for _ in $(seq 900); do
        [ "$(loaded)" -ge 1 ] && break
        kill -0 "$vp" 2>/dev/null || { cat "$tmp/vg.out" "$tmp"/vg.*.log >&2; fail "nginx under valgrind exited"; }
        sleep 0.5
    done
    [ "$(loaded)" -ge 1 ] || fail "nginx under valgrind did not load the component"
    sleep 1
    for i in $(seq 6); do
        code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 60 "$url/$i") || code=none
        [ "$code" = 200 ] || fail "under valgrind: GET /$i gave $code"
    done
    curl -sS -o /dev/null --max-time 60 --data-binary @"$tmp/text.wasm" "$url/" >/dev/null
    # a client that goes away
    curl -sS -o /dev/null --max-time 1 "$url/s/sleep/1800" 2>/dev/null
    kill -QUIT "$vp"
    # a graceful stop under valgrind takes a while; a hang fails the test
    for _ in $(seq 1200); do kill -0 "$vp" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$vp" 2>/dev/null; then
        kill -KILL "$vp"
        fail "nginx under valgrind did not stop within 600 s of SIGQUIT"
    fi
    wait "$vp"
    rc=$?
    vlog=$(grep -l "Command: $NGINX" "$tmp"/vg.*.log | while read -r f; do
        grep -q 'ERROR SUMMARY' "$f" && echo "$f"; done | head -1)
    for f in "$tmp"/vg.*.log; do
        # the load-check child and nginx itself: no error in either
        grep -q 'ERROR SUMMARY: 0 errors' "$f" || { cat "$f" >&2; fail "valgrind reported errors ($f)"; }
    done
    [ "$rc" != 99 ] || fail "valgrind's exit code says errors"
    grep -q 'definitely lost: [1-9]' "$tmp"/vg.*.log && fail "valgrind: memory definitely lost"
    ok "under valgrind (master_process off): 8 requests and an abort, 0 errors, no definite leak ($(grep -h 'in use at exit' "$vlog" | sed 's/^==[0-9]*== *//'))"
elif [ "$REQUIRE_GUESTS" = 1 ] && [ "${VALGRIND:-1}" != 0 ]; then
    fail "valgrind is not installed"
else
    echo "SKIPPED the valgrind run"
fi

echo "all nginx module checks passed"
