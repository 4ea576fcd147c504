#!/usr/bin/env bash
# The GPU runner, staged as gpu-stage/run.sh by scripts/stage-gpu.sh. Runs on a machine with a GPU and no Rust
# toolchain: the test binaries with SPECDEC_REQUIRE_GPU=1, the GPU tests again under compute-sanitizer (when it
# is installed), the main job on CUDA, and the peer harness (PyTorch). Logs and tables go to $OUT (or ./out).
# The last line is "N passed, N failed" over those steps.
#
#   bash gpu-stage/run.sh                  # everything
#   bash gpu-stage/run.sh tests sanitize   # some of: tests sanitize bench peers (to split a run that would
#                                          # exceed one call's time limit on the GPU machine)
set -uo pipefail
parts=${*:-tests sanitize bench peers}
want() { [[ " $parts " == *" $1 "* ]]; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"
out=${OUT:-$here/out}
mkdir -p "$out"
passed=0
failed=0
step() { # step NAME LOG COMMAND...: runs a step, logs it, counts it
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  if "$@" >"$out/$log" 2>&1; then
    passed=$((passed + 1))
    echo "PASS $name ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1))
    echo "FAIL $name ($((SECONDS - start)) s); last lines of $log:"
    tail -n 25 "$out/$log"
  fi
}

echo "# specdec GPU run"
echo "- commit: $(cat COMMIT)"
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/- gpu: /'
export SPECDEC_REQUIRE_GPU=1 SPECDEC_COMMIT
SPECDEC_COMMIT=$(cat COMMIT)

if want tests; then
  for t in tests/*; do
    step "tests/$(basename "$t")" "test-$(basename "$t").log" "$t"
  done
fi

# Per test binary: the tests memcheck runs (all when empty), then the ones the slower tools run.
sanitized() {
  local t=$1 tool=$2
  case "$(basename "$t"):$tool" in
    greedy_gpu:memcheck) echo "" ;;
    greedy_gpu:*) echo "special_values bad_requests c_abi raw_pointers" ;;
    sampling_gpu:*) echo "bad_requests tokens_equal tree_of_iid_children vocabulary_sizes" ;;
    int4_gpu:memcheck) echo "quantizer_is_byte_identical gemv_handles_the_awkward_shapes misaligned c_abi" ;;
    int4_gpu:*) echo "gemv_handles_the_awkward_shapes c_abi" ;;
    attention_gpu:memcheck) echo "bad_requests compaction long_prefixes" ;;
    attention_gpu:*) echo "bad_requests compaction" ;;
  esac
}
if ! want sanitize; then
  :
elif command -v compute-sanitizer >/dev/null; then
  for t in tests/greedy_gpu tests/sampling_gpu tests/int4_gpu tests/attention_gpu; do
    # shellcheck disable=SC2046 # the filters are separate words
    step "memcheck $(basename "$t")" "memcheck-$(basename "$t").log" \
      compute-sanitizer --tool memcheck --leak-check full --error-exitcode 99 "$t" --test-threads=1 $(sanitized "$t" memcheck)
    for tool in racecheck synccheck initcheck; do
      # shellcheck disable=SC2046
      step "$tool $(basename "$t")" "$tool-$(basename "$t").log" \
        compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" --test-threads=1 $(sanitized "$t" "$tool")
    done
  done
else
  echo "SKIP compute-sanitizer: not installed"
fi

if want bench; then
  step "bench (main job on CUDA)" bench.md ./bench --backend cuda
  cat "$out/bench.md"
fi
if ! want peers; then
  :
elif python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  step "peers (PyTorch)" peers.md python3 peers.py --lib ./libspecdec.so
  cat "$out/peers.md"
else
  echo "SKIP peers: no PyTorch with CUDA"
fi

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
