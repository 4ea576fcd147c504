#!/usr/bin/env bash
# Builds the library, then compiles tests/c/abi_test.c against include/specdec.h twice (C99 linked to the static
# library, C++17 linked to the shared one), each with -Wall -Wextra -Werror, and runs both. The device-pointer part
# runs where CUDA is usable: SPECDEC_C_TEST_RUNNER=sim/run SPECDEC_REQUIRE_GPU=1 tests/c/run.sh runs it on the
# simulator.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
cargo build --quiet --lib
lib=target/debug
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
warn=(-Wall -Wextra -Werror -pedantic -Iinclude)
${CC:-cc} -std=c99 "${warn[@]}" tests/c/abi_test.c "$lib/libspecdec.a" -lpthread -ldl -lm -o "$out/abi_test_c99"
${CXX:-c++} -std=c++17 "${warn[@]}" -x c++ tests/c/abi_test.c -x none -L"$lib" -lspecdec -Wl,-rpath,"$root/$lib" -o "$out/abi_test_cxx17"
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
