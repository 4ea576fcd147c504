#!/usr/bin/env bash
# Stages one family's GPU run in gpu-stage/ (git-ignored), ready to carry to a GPU machine that has no Rust
# toolchain: the family's GPU test binary, the main job `bench`, the Python package (python/specdec_kernels, with
# libspecdec.so, and the cffi and pycparser wheels for the GPU image's Python 3.12, which lacks them) for the peer
# harness, peers.py and the runner (scripts/gpu-run.sh as run.sh), all stripped, with kernels for sm_90 only (the lent GPUs are
# H100/H200). There: `bash gpu-stage/run.sh FAMILY` (see scripts/gpu-run.sh).
#
#   scripts/stage-gpu.sh greedy                      # or sampling, int4, attention; all stages every family
#   SPECDEC_CUDA_ARCHS=80 scripts/stage-gpu.sh int4  # other architectures
#   SPECDEC_STAGE_PROFILE=debug scripts/stage-gpu.sh all   # the debug binaries cargo test built, for a run on the
#                                                           # CPU simulator (CI); no size limit
#
# A release stage must fit, with the checkout, in what a GPU run carries (64 MiB): the stage is held to 48 MiB.
# Each binary embeds every family's kernels (about 11 MB for sm_90), so one family fits and all four do not.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
family=${1:-}
case "$family" in
  greedy | sampling | int4 | attention) families=$family ;;
  all) families="greedy sampling int4 attention" ;;
  *)
    echo "usage: scripts/stage-gpu.sh greedy|sampling|int4|attention|all" >&2
    exit 2
    ;;
esac
stage=${SPECDEC_STAGE_DIR:-$root/gpu-stage}
profile=${SPECDEC_STAGE_PROFILE:-release}
limit_mib=48

command -v nvcc >/dev/null || eval "$(scripts/install-nvcc.sh)"
export SPECDEC_REQUIRE_CUDA=1
case "$profile" in
  release)
    export SPECDEC_CUDA_ARCHS=${SPECDEC_CUDA_ARCHS:-90}
    cargo_profile=(--release)
    ;;
  debug) cargo_profile=() ;;
  *)
    echo "stage-gpu: SPECDEC_STAGE_PROFILE must be release or debug" >&2
    exit 2
    ;;
esac

echo "building $profile test binaries, the main job and the shared library with CUDA kernels..." >&2
tests_json=$(mktemp)
trap 'rm -f "$tests_json"' EXIT
test_targets=()
for f in $families; do test_targets+=(--test "${f}_gpu"); done
cargo test "${cargo_profile[@]}" --locked --no-run --message-format=json "${test_targets[@]}" 2>/dev/null >"$tests_json"
cargo build "${cargo_profile[@]}" --locked --quiet --lib --example bench

rm -rf "$stage"
mkdir -p "$stage/tests"
python3 - "$tests_json" "$stage/tests" <<'PY'
import json, shutil, sys, os
messages, dest = sys.argv[1], sys.argv[2]
for line in open(messages):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("profile", {}).get("test") and msg.get("executable"):
        shutil.copy(msg["executable"], os.path.join(dest, msg["target"]["name"]))
PY
cp "target/$profile/examples/bench" "target/$profile/libspecdec.so" "$stage/"
cp bench/peers.py "$stage/"
# The package as sources (the header link dereferenced); libspecdec.so is found through SPECDEC_KERNELS_LIBRARY.
mkdir -p "$stage/python"
cp -RL python/specdec_kernels python/tests "$stage/python/"
rm -rf "$stage"/python/*/__pycache__ "$stage"/python/specdec_kernels/_libspecdec*
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$stage/wheels" cffi==2.1.1 pycparser==2.23
cp scripts/gpu-run.sh "$stage/run.sh"
strip "$stage"/tests/* "$stage/bench" "$stage/libspecdec.so"
commit=$(git rev-parse --short=12 HEAD)
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then commit="$commit+uncommitted"; fi
echo "$commit" >"$stage/COMMIT"

size_kib=$(du -sk "$stage" | cut -f1)
ls -la "$stage" "$stage/tests" >&2
if [[ $profile == release ]] && ((size_kib > limit_mib * 1024)); then
  echo "stage-gpu: $stage is $((size_kib / 1024)) MiB, over the $limit_mib MiB limit" >&2
  exit 1
fi
echo "staged $stage ($profile, $families: $((size_kib / 1024)) MiB, commit $commit); on the GPU machine run:" \
  "bash gpu-stage/run.sh $family" >&2
