#!/usr/bin/env bash
# Mutation tests of the simulator: each mutant is a real kernel with one defect of a kind the simulator exists to
# catch. For each, the script copies cuda/ to a scratch folder, applies the mutation (which must match exactly
# once), builds that kernel family's module from the copy (the other families are links to the normal build),
# runs the named GPU test on the simulator with SPECDEC_SIM_KERNELS pointing at the scratch modules, and requires
# the test to fail with the expected sign. The test binaries are the unchanged ones `cargo test` built; their
# fatbins are unmutated, so only what the simulator runs differs.
#
#   sim/mutants.sh            # after `cargo test --no-run` (kernels compiled) and `make -C sim`
#
# The small-kernel cases (a read one element past a row, a grid dimension over its limit, a partial barrier,
# bad warp masks) are in sim/tests/check.cpp. Mutants run side by side, one per core (each builds and runs on one
# thread); their reports are printed in order. Ends with "N passed, N failed" (a pass is a caught mutant).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${SPECDEC_SIM_OUT:-$root/target/sim}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The GPU test binaries cargo built (the newest of each name).
binary() { ls -t target/debug/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -n 1; }

# mutant NAME FILE OLD NEW FAMILY TEST FILTER SIGN: SIGN is a phrase the failing run must print.
mutant() {
  local name=$1 file=$2 old=$3 new=$4 family=$5 test=$6 filter=$7 sign=$8
  local dir="$scratch/$name" start=$SECONDS
  mkdir -p "$dir/kernels"
  cp -r cuda "$dir/cuda"
  if ! python3 - "$dir/$file" "$old" "$new" <<'PY'; then
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"the mutation matches {text.count(old)} times in {path}, not once")
open(path, "w").write(text.replace(old, new))
PY
    echo "FAIL $name: the mutation does not apply"
    return
  fi
  for so in "$out"/kernels/*.so; do ln -s "$so" "$dir/kernels/"; done
  rm -f "$dir/kernels/$family.so"
  if ! make --no-print-directory -s -C sim OUT="$out" CUDA_SRC="$dir/cuda" KERNELS_OUT="$dir/kernels" \
    "$dir/kernels/$family.so" >"$dir/build.log" 2>&1; then
    echo "FAIL $name: the mutant does not build"
    tail -n 20 "$dir/build.log"
    return
  fi
  local bin
  bin=$(binary "$test")
  if [[ -z "$bin" ]]; then
    echo "FAIL $name: no $test binary (run cargo test --no-run first)"
    return
  fi
  if SPECDEC_SIM_NO_BUILD=1 SPECDEC_SIM_KERNELS="$dir/kernels" SPECDEC_REQUIRE_GPU=1 \
    timeout 900 sim/run "$bin" --exact "$filter" >"$dir/run.log" 2>&1; then
    echo "FAIL $name: the mutant passed $test $filter"
  elif ! grep -q -- "$sign" "$dir/run.log"; then
    echo "FAIL $name: $test failed, but without \"$sign\":"
    tail -n 30 "$dir/run.log"
  else
    echo "PASS $name: caught by $test $filter ($((SECONDS - start)) s): $(grep -m 1 -- "$sign" "$dir/run.log" | cut -c 1-160)"
  fi
}

# launch NAME ...: `mutant NAME ...` in the background, its report in $scratch/NAME.report, once fewer than one
# mutant per core is running.
launched=()
launch() {
  while (($(jobs -rp | wc -l) >= $(nproc))); do wait -n; done
  launched+=("$1")
  mutant "$@" >"$scratch/$1.report" 2>&1 &
}

# 1. The barrier that publishes a prefix tile to every warp, removed: warps read tiles other warps' copies have
#    not landed in (poison: NaN), so outputs differ from the reference.
launch attention-no-barrier-after-wait cuda/tree_attention.cu \
  $'    CopyAsyncWait<1>();\n    __syncthreads();\n' \
  $'    CopyAsyncWait<1>();\n' \
  tree_attention attention_gpu gpu_long_prefixes_split_and_merge_exactly "panicked"

# 2. The cp.async wait of the prefix pipeline, removed: a tile is read before its copies land.
launch attention-no-copy-wait cuda/tree_attention.cu \
  $'    CopyAsyncWait<1>();\n    __syncthreads();\n' \
  $'    __syncthreads();\n' \
  tree_attention attention_gpu gpu_long_prefixes_split_and_merge_exactly "panicked"

# 3. A wrong lane in an mma fragment: each lane loads the activation columns of its neighbour in the quad.
launch int4-wrong-fragment-lane cuda/int4.cu \
  'x + row * k + chunk * kTileCols + 32 * h + 8 * quad_pos))' \
  'x + row * k + chunk * kTileCols + 32 * h + 8 * (quad_pos ^ 1)))' \
  int4 int4_gpu gemv_matches_the_f64_reference_for_every_group_dtype_and_m "panicked"

# 4. A shuffle whose mask leaves out lane 31 (the warp argmax of greedy verification).
launch greedy-shuffle-wrong-mask cuda/common.cuh \
  'uint64_t other = __shfl_xor_sync(0xFFFFFFFFu, v, offset);' \
  'uint64_t other = __shfl_xor_sync(0x7FFFFFFFu, v, offset);' \
  greedy_verify greedy_gpu special_values_are_flagged_alone "leaves out the calling lane 31"

wait
passed=0
for name in "${launched[@]}"; do
  cat "$scratch/$name.report"
  grep -q "^PASS $name:" "$scratch/$name.report" && passed=$((passed + 1))
done
failed=$((${#launched[@]} - passed))
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
