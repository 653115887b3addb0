#!/bin/bash
# Builds ngx_http_wasmpool_module.so against the installed nginx (Debian's
# nginx-dev headers in /usr/share/nginx/src), without downloading nginx.
#
#   WASMPOOL_LIB_DIR=/dir/with/libwasmpool.so ./build.sh
#
# Environment:
#   WASMPOOL_LIB_DIR  directory with libwasmpool.so (or libwasmpool.so.0);
#                     default: the directory of an installed
#                     libwasmpool.so.0 (ldconfig), else <repo>/target/release
#   WASMPOOL_RPATH    the module's run path (DT_RUNPATH): a directory, or
#                     `none` for none (the dynamic linker then finds
#                     libwasmpool.so.0 in the system's library directories:
#                     what a packaged module needs); default WASMPOOL_LIB_DIR
#   NGINX_SRC         nginx-dev tree (default /usr/share/nginx/src)
#   BUILD_DIR         where to build (default: a new temporary directory)
#
# The last line printed is the path of the built module.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
NGINX_SRC=${NGINX_SRC:-/usr/share/nginx/src}

if [ -z "${WASMPOOL_LIB_DIR:-}" ]; then
    installed=$(/sbin/ldconfig -p 2>/dev/null | awk '/libwasmpool\.so\.0 /{print $NF; exit}')
    if [ -n "$installed" ]; then
        WASMPOOL_LIB_DIR=$(dirname "$installed")
    else
        WASMPOOL_LIB_DIR=$repo/target/release
    fi
fi
WASMPOOL_LIB_DIR=$(cd "$WASMPOOL_LIB_DIR" && pwd)

# Link against the development name if there is one, else the SONAME.
if [ -e "$WASMPOOL_LIB_DIR/libwasmpool.so" ]; then
    WASMPOOL_LINK=-lwasmpool
elif [ -e "$WASMPOOL_LIB_DIR/libwasmpool.so.0" ]; then
    WASMPOOL_LINK=-l:libwasmpool.so.0
else
    echo "build.sh: no libwasmpool.so in $WASMPOOL_LIB_DIR (set WASMPOOL_LIB_DIR)" >&2
    exit 1
fi
WASMPOOL_RPATH=${WASMPOOL_RPATH:-$WASMPOOL_LIB_DIR}
export WASMPOOL_LIB_DIR WASMPOOL_LINK WASMPOOL_RPATH

if [ ! -x "$NGINX_SRC/configure" ] || [ ! -f "$NGINX_SRC/conf_flags" ]; then
    echo "build.sh: $NGINX_SRC is not an nginx-dev tree (apt-get install nginx-dev)" >&2
    exit 1
fi

BUILD_DIR=${BUILD_DIR:-$(mktemp -d /tmp/wasmpool-nginx-build-XXXXXX)}
case "$BUILD_DIR" in
    *.*)
        # nginx's configure turns "x.c" into "x.o" with sed over the whole
        # object path: a dot in the build directory's path can break that
        echo "build.sh: BUILD_DIR must not contain a dot: $BUILD_DIR" >&2
        exit 1 ;;
esac
mkdir -p "$BUILD_DIR"
rm -rf "$BUILD_DIR/src"
cp -a "$NGINX_SRC" "$BUILD_DIR/src"

# The flags Debian configured its nginx with: the module must have the same
# ABI (--with-compat is the key one; the others keep the struct layouts and
# the module signature the same as the installed binary's).
# shellcheck disable=SC1091
. "$BUILD_DIR/src/conf_flags"

cflags="-g -O2 -fstack-protector-strong -Wformat -Werror=format-security -fPIC -Wdate-time -D_FORTIFY_SOURCE=2"
ldflags="-Wl,-z,relro -Wl,-z,now -fPIC"
if command -v dpkg-buildflags >/dev/null 2>&1; then
    cflags="$(dpkg-buildflags --get CFLAGS) -fPIC $(dpkg-buildflags --get CPPFLAGS)"
    ldflags="$(dpkg-buildflags --get LDFLAGS) -fPIC"
fi

cd "$BUILD_DIR/src"
./configure \
    --with-cc-opt="$cflags" \
    --with-ld-opt="$ldflags" \
    "${NGX_CONF_FLAGS[@]}" \
    --add-dynamic-module="$here" \
    --builddir="$BUILD_DIR/objs" >"$BUILD_DIR/configure.log" 2>&1 || {
        tail -30 "$BUILD_DIR/configure.log" >&2
        echo "build.sh: configure failed, see $BUILD_DIR/configure.log" >&2
        exit 1
    }

make -f "$BUILD_DIR/objs/Makefile" modules >"$BUILD_DIR/make.log" 2>&1 || {
    cat "$BUILD_DIR/make.log" >&2
    echo "build.sh: make modules failed" >&2
    exit 1
}

module="$BUILD_DIR/objs/ngx_http_wasmpool_module.so"
[ -f "$module" ] || { echo "build.sh: $module was not built" >&2; exit 1; }
echo "$module"
