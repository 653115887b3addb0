#!/usr/bin/env bash
# Builds libnginx-mod-http-wasmpool, the nginx module of ffi/nginx/, the way
# Debian builds its libnginx-mod-* packages (dh_nginx, dh_shlibdeps,
# dh_gencontrol), with dpkg-dev's tools:
#   /usr/lib/nginx/modules/ngx_http_wasmpool_module.so
#       built by ffi/nginx/build.sh against the installed nginx-dev, linked
#       against libwasmpool.so.0 with no run path (the library is found in
#       /usr/lib/<multiarch>/, where libwasmpool0 installs it)
#   /usr/share/nginx/modules-available/mod-http-wasmpool.conf
#       its load_module line
#   maintainer scripts made from nginx-dev's debhelper autoscripts (as
#       dh_nginx makes them): installing links the .conf as
#       /etc/nginx/modules-enabled/50-mod-http-wasmpool.conf, removing moves
#       the link aside, purging deletes it; each asks nginx to reload
#   Depends: the nginx ABI the module was built for (nginx-abi-*, from the
#       installed nginx's Provides) and what dpkg-shlibdeps finds: libc6,
#       and libwasmpool0 through the shlibs file of the libwasmpool0 package
#
#   packaging/build-deb-nginx.sh LIBWASMPOOL0_DEB [OUTPUT_DIR]
#
# LIBWASMPOOL0_DEB is the library package build-deb.sh made (with its shlibs
# file): the module is linked against the library in it and gets its
# version. OUTPUT_DIR defaults to the directory of LIBWASMPOOL0_DEB. Needs
# nginx-dev, dpkg-dev and binutils; builds no Rust. build-deb.sh runs it.
# Prints the path of the package on its last line.
set -euo pipefail
umask 022

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 LIBWASMPOOL0_DEB [OUTPUT_DIR]" >&2
  exit 2
fi
libdeb=$(realpath "$1")
outdir=${2:-$(dirname "$libdeb")}
mkdir -p "$outdir"
outdir=$(realpath "$outdir")
cd "$(dirname "$0")/.."
pkg=libnginx-mod-http-wasmpool
meta=packaging/debian/$pkg
autoscripts=/usr/share/debhelper/autoscripts
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
[ "$(dpkg-deb -f "$libdeb" Package)" = libwasmpool0 ] || {
  echo "build-deb-nginx.sh: $libdeb is not the libwasmpool0 package" >&2
  exit 1
}
version=$(dpkg-deb -f "$libdeb" Version)

# The ABI of the installed nginx, which the module is built for: nginx
# provides nginx-abi-VERSION, and modules depend on it (nginx refuses to
# load a module built for another one). nginx-dev's headers say the same
# (dh_nginx reads them); a mismatch means they are not the same nginx.
abi=$(dpkg-query -W -f '${Provides}' nginx | tr ',' '\n' |
  sed -n 's/^ *\(nginx-abi-[^ ]*\).*$/\1/p')
if [ -z "$abi" ]; then
  echo "build-deb-nginx.sh: the installed nginx provides no nginx-abi-*" >&2
  exit 1
fi
dev_abi=$(sed -n 's/^nginx:abi=//p' /usr/share/nginx/src/debian/libnginx-mod.abisubstvars 2>/dev/null || true)
if [ -n "$dev_abi" ] && [ "$dev_abi" != "$abi" ]; then
  echo "build-deb-nginx.sh: nginx provides $abi but nginx-dev's headers are $dev_abi" >&2
  exit 1
fi
for s in postinst prerm postrm; do
  [ -f "$autoscripts/$s-nginx" ] || {
    echo "build-deb-nginx.sh: no $autoscripts/$s-nginx (apt-get install nginx-dev)" >&2
    exit 1
  }
done

# A debian/ directory as dpkg-shlibdeps and dpkg-gencontrol expect it, the
# library package unpacked beside the module's. nginx's configure cannot
# build in a directory whose path has a dot (see ffi/nginx/build.sh), so
# the directory is made in /tmp, not $TMPDIR.
tmp=$(mktemp -d /tmp/wasmpool-deb-nginx-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
src=$tmp/src
mkdir -p "$src/debian"
cp "$meta/control" "$src/debian/control"
cp packaging/debian/changelog "$src/debian/changelog"
dpkg-deb -R "$libdeb" "$src/debian/libwasmpool0"
[ -f "$src/debian/libwasmpool0/DEBIAN/shlibs" ] || {
  echo "build-deb-nginx.sh: $libdeb has no shlibs file" >&2
  exit 1
}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l packaging/debian/changelog -STimestamp)}

# The module, built the way Debian builds nginx and its modules
# (hardening=+all: also bind-now), with no run path.
module=$(WASMPOOL_LIB_DIR="$src/debian/libwasmpool0/usr/lib/$multiarch" WASMPOOL_RPATH=none \
  BUILD_DIR="$tmp/build" DEB_BUILD_MAINT_OPTIONS=hardening=+all \
  ffi/nginx/build.sh | tail -n 1)
if readelf -d "$module" | grep -E '\((RPATH|RUNPATH)\)' >&2; then
  echo "build-deb-nginx.sh: the module has a run path" >&2
  exit 1
fi

root=$src/debian/$pkg
install -d "$root/DEBIAN" "$root/usr/lib/nginx/modules" \
  "$root/usr/share/nginx/modules-available" "$root/usr/share/doc/$pkg"
# As dh_strip strips shared objects.
strip --remove-section=.comment --remove-section=.note --strip-unneeded \
  -o "$root/usr/lib/nginx/modules/ngx_http_wasmpool_module.so" "$module"
chmod 644 "$root/usr/lib/nginx/modules/ngx_http_wasmpool_module.so"
install -m 644 "$meta/mod-http-wasmpool.conf" "$root/usr/share/nginx/modules-available/"
install -m 644 packaging/debian/copyright "$root/usr/share/doc/$pkg/copyright"
gzip -9 -n -c packaging/debian/changelog >"$root/usr/share/doc/$pkg/changelog.Debian.gz"
chmod 644 "$root/usr/share/doc/$pkg/changelog.Debian.gz"

# The maintainer scripts dh_nginx writes: its autoscripts with #NAMES# the
# module's "CONF:PRIORITY-CONF" (50: an http module, as dh_nginx guesses
# from the package name).
names=mod-http-wasmpool.conf:50-mod-http-wasmpool.conf
for s in postinst prerm postrm; do
  {
    printf '#!/bin/sh\nset -e\n'
    printf '# Automatically added by dh_nginx (from %s)\n' "$autoscripts/$s-nginx"
    sed "s/#NAMES#/$names/g" "$autoscripts/$s-nginx"
    printf '# End automatically added section\n'
  } >"$root/DEBIAN/$s"
  chmod 755 "$root/DEBIAN/$s"
done

# Depends, as dh_nginx, dh_shlibdeps and dh_gencontrol compute it.
printf 'nginx:abi=%s\nmisc:Depends=\n' "$abi" >"$src/debian/$pkg.substvars"
(
  cd "$src"
  dpkg-shlibdeps -Tdebian/$pkg.substvars -Sdebian/libwasmpool0 \
    -edebian/$pkg/usr/lib/nginx/modules/ngx_http_wasmpool_module.so
  dpkg-gencontrol -p$pkg -v"$version" -Tdebian/$pkg.substvars -Pdebian/$pkg -fdebian/files
) >&2
grep -q '^Depends:.*libwasmpool0' "$root/DEBIAN/control" || {
  echo "build-deb-nginx.sh: no libwasmpool0 in Depends:" >&2
  cat "$root/DEBIAN/control" >&2
  exit 1
}
(
  cd "$root"
  find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0r md5sum
) >"$root/DEBIAN/md5sums"
chmod 644 "$root/DEBIAN/md5sums"

deb=$outdir/${pkg}_${version#*:}_$arch.deb
dpkg-deb --root-owner-group -Zxz -b "$root" "$deb" >&2
echo "$deb"
