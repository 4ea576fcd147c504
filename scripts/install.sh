#!/usr/bin/env bash
# Installs specdec for C and C++ users under PREFIX (default /usr/local): the static library, the shared library
# under its SONAME with the usual links, the header and a pkg-config file.
#
#   scripts/install.sh [PREFIX]                       # builds the release library first
#   SPECDEC_PROFILE=debug scripts/install.sh PREFIX   # installs what `cargo build` already built (tests/c/run.sh)
#
# Then: cc app.c $(PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs specdec) (shared), or
# pkg-config --static --libs specdec with PREFIX/lib/libspecdec.a (static). Linux only.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
prefix=${1:-/usr/local}
profile=${SPECDEC_PROFILE:-release}
case $profile in
  release) cargo build --quiet --release --lib ;;
  debug) ;;
  *) echo "SPECDEC_PROFILE must be release or debug, not '$profile'" >&2; exit 2 ;;
esac
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
IFS=. read -r major minor _ <<<"$version"
if [ "$major" = 0 ]; then soname=libspecdec.so.0.$minor; else soname=libspecdec.so.$major; fi
lib=target/$profile
for f in "$lib/libspecdec.a" "$lib/libspecdec.so"; do
  [ -f "$f" ] || { echo "$f is missing: build the library first (cargo build --lib)" >&2; exit 1; }
done
actual=$(readelf -d "$lib/libspecdec.so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
[ "$actual" = "$soname" ] || { echo "$lib/libspecdec.so has SONAME '$actual', expected $soname" >&2; exit 1; }

install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 644 "$lib/libspecdec.a" "$prefix/lib/"
install -m 755 "$lib/libspecdec.so" "$prefix/lib/libspecdec.so.$version"
ln -sf "libspecdec.so.$version" "$prefix/lib/$soname"
ln -sf "$soname" "$prefix/lib/libspecdec.so"
install -m 644 include/specdec.h "$prefix/include/"
cat >"$prefix/lib/pkgconfig/specdec.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: specdec
Description: CUDA kernels for speculative decoding in LLM RL rollouts (CPU backend included)
Version: $version
Libs: -L\${libdir} -lspecdec
Libs.private: -lpthread -ldl -lm
Cflags: -I\${includedir}
PC
echo "installed specdec $version ($soname) under $prefix"
