#!/usr/bin/env bash
# Builds stripped release binaries with the CUDA kernels (every test binary, the main job `bench`, and
# libspecdec.so for the peer harness) and stages them with the runner in gpu-stage/ (git-ignored), ready to
# carry to a GPU machine that has no Rust toolchain. There: `bash gpu-stage/run.sh` (see scripts/gpu-run.sh).
#
#   scripts/stage-gpu.sh                      # kernels for SPECDEC_CUDA_ARCHS (default 80;86;89;90)
#   SPECDEC_CUDA_ARCHS=90 scripts/stage-gpu.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
stage=${SPECDEC_STAGE_DIR:-$root/gpu-stage}
limit_mib=48

command -v nvcc >/dev/null || eval "$(scripts/install-nvcc.sh)"
export SPECDEC_REQUIRE_CUDA=1

echo "building release test binaries, the main job and the shared library with CUDA kernels..." >&2
tests_json=$(mktemp)
trap 'rm -f "$tests_json"' EXIT
cargo test --release --no-run --message-format=json 2>/dev/null >"$tests_json"
cargo build --release --quiet --lib --example bench

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
        name = msg["target"]["name"]
        if name == "header":  # checks the source tree, which the GPU machine's copy may not have at this path
            continue
        target = os.path.join(dest, name)
        shutil.copy(msg["executable"], target)
PY
cp target/release/examples/bench target/release/libspecdec.so "$stage/"
cp bench/peers.py scripts/gpu-run.sh "$stage/"
mv "$stage/gpu-run.sh" "$stage/run.sh"
strip "$stage"/tests/* "$stage/bench" "$stage/libspecdec.so"
commit=$(git rev-parse --short=12 HEAD)
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then commit="$commit+uncommitted"; fi
echo "$commit" >"$stage/COMMIT"

size_kib=$(du -sk "$stage" | cut -f1)
ls -la "$stage" "$stage/tests" >&2
if (( size_kib > limit_mib * 1024 )); then
  echo "stage-gpu: $stage is $((size_kib / 1024)) MiB, over the $limit_mib MiB limit" >&2
  exit 1
fi
echo "staged $stage ($((size_kib / 1024)) MiB, commit $commit); on the GPU machine run: bash gpu-stage/run.sh" >&2
