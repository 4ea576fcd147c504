#!/usr/bin/env bash
# Builds the library, then compiles tests/c/abi_test.c against include/specdec.h twice (C99 linked to the static
# library, C++17 linked to the shared one), each with -Wall -Wextra -Werror, and runs both.
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
echo "C99 (static library):"
"$out/abi_test_c99"
echo "C++17 (shared library):"
"$out/abi_test_cxx17"
