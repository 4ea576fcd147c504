#!/usr/bin/env bash
# The GPU runner, staged as gpu-stage/run.sh by scripts/stage-gpu.sh. Runs one family's checks and timings on a
# machine with a GPU and no Rust toolchain, in this order: the family's GPU tests with SPECDEC_REQUIRE_GPU=1;
# compute-sanitizer's memcheck on them; racecheck, synccheck and initcheck on a chosen subset; the main job's
# rows for the family; the peers (PyTorch, through the Python package) on the same inputs; the Python package's
# CUDA tests (python/tests/test_cuda.py). The last line is "N passed, N failed".
#
#   bash gpu-stage/run.sh greedy                 # one family: greedy, sampling, int4, attention (or all)
#   bash gpu-stage/run.sh int4 tests sanitize    # some parts of it: tests sanitize bench peers python
#
# Sized for a lent GPU machine (one command of at most 10 minutes, at most 8 files back): every step runs under
# its own time limit and all of them under one budget (SPECDEC_RUNNER_BUDGET_S, default 450 s), so a hung kernel
# costs one step, not the run, and the run ends within the budget plus a few seconds of archiving. What comes back
# is four files in $OUT (default ./out): summary.md (everything printed here), bench.md and peers.md (the
# tables for bench/RESULTS.md) and logs.tar.gz (every step's full log). A compute-sanitizer that refuses the
# device (it does under gVisor: "Device not supported") is reported as SKIPPED with its own message.
#
# On the CPU simulator (CI): SPECDEC_RUNNER_WRAP=sim/run runs every binary through it, and
# SPECDEC_RUNNER_TIME_SCALE multiplies the time limits and the budget, since simulated kernels are slow.
set -uo pipefail
family=${1:-}
shift || true
case "$family" in
  greedy | sampling | int4 | attention) families=$family ;;
  all) families="greedy sampling int4 attention" ;;
  *)
    echo "usage: run.sh greedy|sampling|int4|attention|all [tests] [sanitize] [bench] [peers]" >&2
    exit 2
    ;;
esac
parts=${*:-tests sanitize bench peers python}
for part in $parts; do
  [[ " tests sanitize bench peers python " == *" $part "* ]] || {
    echo "run.sh: unknown part $part (tests, sanitize, bench, peers or python)" >&2
    exit 2
  }
done
want() { [[ " $parts " == *" $1 "* ]]; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"
out=${OUT:-$here/out}
logs=$out/logs
mkdir -p "$logs"
scale=${SPECDEC_RUNNER_TIME_SCALE:-1}
budget=$((${SPECDEC_RUNNER_BUDGET_S:-450} * scale))
deadline=$((SECONDS + budget))
# An array, so that an empty wrapper adds no word.
read -r -a wrap <<<"${SPECDEC_RUNNER_WRAP:-}"
quick=()
[[ -n "${SPECDEC_RUNNER_QUICK:-}" ]] && quick=(--quick)
export SPECDEC_REQUIRE_GPU=1 SPECDEC_COMMIT
SPECDEC_COMMIT=$(cat COMMIT)
passed=0
failed=0

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND under min(LIMIT_S * scale, what is left of the budget), logs it
# under logs/, counts it, and prints one line (and the log's tail on failure). A failed step whose log matches
# $refusal (when set) is not counted: unless it timed out, it prints SKIPPED with the matching line and returns 3.
refusal=
step() {
  local name=$1 limit=$(($2 * scale)) log=$logs/$3 start=$SECONDS rc
  shift 3
  local left=$((deadline - SECONDS))
  if ((left < 5)); then
    failed=$((failed + 1))
    echo "FAIL $name: not run, the run's budget of $budget s is spent"
    return 1
  fi
  ((limit > left)) && limit=$left
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local refused
  # Whatever the exit status (a tool may refuse the device and still exit 0), unless the step timed out.
  if ((rc != 124 && rc != 137)) && [[ -n $refusal ]] && refused=$(grep -m 1 -E "$refusal" "$log"); then
    echo "SKIPPED $name: the tool refused this machine: $refused"
    return 3
  fi
  if ((rc == 0)); then
    passed=$((passed + 1))
    echo "PASS $name ($((SECONDS - start)) s)"
  elif ((rc == 124 || rc == 137)); then
    failed=$((failed + 1))
    echo "FAIL $name: timed out after $limit s; last lines of logs/$(basename "$log"):"
    tail -n 15 "$log"
  else
    failed=$((failed + 1))
    echo "FAIL $name (exit $rc, $((SECONDS - start)) s); last lines of logs/$(basename "$log"):"
    tail -n 25 "$log"
  fi
  return "$rc"
}

# The tests each compute-sanitizer tool runs, per test binary (every test when empty). memcheck runs the most;
# the slower tools run the tests that exercise each kernel's shared memory and barriers at small sizes.
sanitized() {
  case "$1:$2" in
    greedy_gpu:memcheck) echo "" ;;
    greedy_gpu:*) echo "special_values bad_requests c_abi raw_pointers" ;;
    sampling_gpu:*) echo "bad_requests empty_trees tokens_equal tree_of_iid_children vocabulary_sizes" ;;
    int4_gpu:memcheck) echo "quantizer_is_byte_identical gemv_handles_the_awkward_shapes misaligned c_abi" ;;
    int4_gpu:*) echo "gemv_handles_the_awkward_shapes c_abi" ;;
    attention_gpu:memcheck) echo "bad_requests compaction long_prefixes" ;;
    attention_gpu:*) echo "bad_requests compaction" ;;
  esac
}

# What compute-sanitizer prints when it cannot run on this machine at all (not a finding in our kernels).
sanitizer_refusal='Device not supported|device is not supported|Unable to find injection library'

sanitize() {
  local f=$1 tool rc
  if ! command -v compute-sanitizer >/dev/null; then
    echo "SKIPPED compute-sanitizer (${f}_gpu): not installed here"
    return
  fi
  for tool in memcheck racecheck synccheck initcheck; do
    local extra=() limit=60
    [[ $tool == memcheck ]] && extra=(--leak-check full) && limit=150
    refusal=$sanitizer_refusal
    # shellcheck disable=SC2046 # the test filters are separate words
    step "$tool ${f}_gpu" "$limit" "$tool-$f.log" compute-sanitizer --tool "$tool" "${extra[@]}" \
      --error-exitcode 99 "tests/${f}_gpu" --test-threads=1 $(sanitized "${f}_gpu" "$tool")
    rc=$?
    refusal=
    if ((rc == 3)); then
      return # the tool refuses the machine: the other tools would too
    fi
  done
}

# "${stdout_to[@]}" FILE COMMAND...: COMMAND's stdout (its tables) to FILE, its stderr (progress) to the step's
# log. A command, not a function, so that `timeout` can run it.
# shellcheck disable=SC2016 # expanded by the inner bash
stdout_to=(bash -c 'out=$1; shift; exec "$@" >"$out"' stdout_to)

run() {
  echo "# specdec GPU run: $families"
  echo
  echo "- commit: $SPECDEC_COMMIT"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/- gpu: /'
  else
    echo "- gpu: no nvidia-smi here${wrap[0]:+ (binaries run through ${wrap[*]})}"
  fi
  echo "- budget: $budget s; parts: $parts"
  echo
  local f
  if want tests; then
    for f in $families; do
      step "tests ${f}_gpu" 150 "test-$f.log" "${wrap[@]}" "tests/${f}_gpu"
    done
  fi
  if want sanitize; then
    for f in $families; do
      sanitize "$f"
    done
  fi
  if want bench; then
    local args=()
    for f in $families; do args+=(--family "$f"); done
    step "bench (main job on CUDA: $families)" 180 bench.log "${stdout_to[@]}" "$out/bench.md" "${wrap[@]}" ./bench \
      --backend cuda "${quick[@]}" "${args[@]}"
    [[ -s $out/bench.md ]] && cat "$out/bench.md"
  fi
  # The Python package (peers and its CUDA tests): cffi and pycparser from the staged wheels (the image has
  # neither), the package from its sources with the staged library.
  local site=${TMPDIR:-/tmp}/specdec-python-site
  local package_env=(env PYTHONPATH="$site:$here/python:$here/python/tests"
    SPECDEC_KERNELS_LIBRARY="$here/libspecdec.so")
  local torch_cuda=
  if { want peers || want python; } && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    torch_cuda=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" wheels/*.whl
  fi
  if want peers; then
    if [[ -n $torch_cuda ]]; then
      local args=()
      for f in $families; do args+=(--family "$f"); done
      # Unbuffered, so that the rows of the cases done survive a timeout.
      step "peers (PyTorch: $families)" 180 peers.log "${stdout_to[@]}" "$out/peers.md" "${package_env[@]}" \
        python3 -u peers.py "${quick[@]}" "${args[@]}"
      [[ -s $out/peers.md ]] && cat "$out/peers.md"
    else
      echo "SKIPPED peers: no PyTorch with CUDA here"
    fi
  fi
  if want python; then
    if [[ -n $torch_cuda ]]; then
      # Every family through the package on CUDA tensors: against the CPU backend, on a side stream, in CUDA
      # graphs, opcheck (python/tests/test_cuda.py; the CPU suite runs in CI).
      step "python package on CUDA (pytest python/tests/test_cuda.py)" 120 python.log "${package_env[@]}" \
        python3 -m pytest -q -p no:cacheprovider python/tests/test_cuda.py
      tail -n 1 "$logs/python.log"
    else
      echo "SKIPPED python: no PyTorch with CUDA here"
    fi
  fi
  tar czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
  echo
  echo "$passed passed, $failed failed"
  ((failed == 0))
}

run 2>&1 | tee "$out/summary.md"
exit "${PIPESTATUS[0]}"
