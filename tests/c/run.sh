#!/usr/bin/env bash
# Builds the library, then compiles tests/c/abi_test.c against include/specdec.h twice (C99 linked to the static
# library; C++17 linked through pkg-config to the shared one, installed with its SONAME by scripts/install.sh),
# each with -Wall -Wextra -Werror, and runs both. The device-pointer part runs where CUDA is usable:
# SPECDEC_C_TEST_RUNNER=sim/run SPECDEC_REQUIRE_GPU=1 tests/c/run.sh runs it on the simulator. Needs pkg-config.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
cargo build --quiet --lib
lib=target/debug
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
warn=(-Wall -Wextra -Werror -pedantic -Iinclude)
${CC:-cc} -std=c99 "${warn[@]}" tests/c/abi_test.c "$lib/libspecdec.a" -lpthread -ldl -lm -o "$out/abi_test_c99"
# The shared library as a user gets it: installed by scripts/install.sh (SONAME, links, pkg-config file) and linked
# with the flags pkg-config gives.
SPECDEC_PROFILE=debug scripts/install.sh "$out/prefix" >/dev/null
pkg=$(PKG_CONFIG_PATH="$out/prefix/lib/pkgconfig" pkg-config --cflags --libs specdec)
# shellcheck disable=SC2086 # pkg-config's flags are words
${CXX:-c++} -std=c++17 "${warn[@]}" -x c++ tests/c/abi_test.c -x none $pkg -Wl,-rpath,"$out/prefix/lib" \
  -o "$out/abi_test_cxx17"
needed=$(readelf -d "$out/abi_test_cxx17" | sed -n 's/.*Shared library: \[\(libspecdec[^]]*\)\].*/\1/p')
[ "$needed" = "$(readelf -d "$lib/libspecdec.so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')" ] || {
  echo "the C++ test needs '$needed', not the library's SONAME"
  exit 1
}
echo "linked through pkg-config against $needed"
# SPECDEC_C_TEST_RUNNER runs the binaries through a wrapper: sim/run, for the device-pointer part on the simulator.
runner=${SPECDEC_C_TEST_RUNNER:-}
echo "C99 (static library):"
$runner "$out/abi_test_c99"
echo "C++17 (shared library):"
$runner "$out/abi_test_cxx17"
# The README's C example: a complete decoding loop on the CPU backend, built with the documented link line.
${CC:-cc} -std=c99 "${warn[@]}" examples/c/decode_loop_cpu.c "$lib/libspecdec.a" -lpthread -ldl -lm \
  -o "$out/decode_loop_cpu"
echo "examples/c/decode_loop_cpu.c:"
"$out/decode_loop_cpu"
