#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, the NVVM back end, the CUDA headers) from PyPI wheels
# into a git-ignored folder of the repository, then prints the line that puts nvcc on PATH.
#
#   scripts/install-nvcc.sh            # installs into .cuda-toolchain/ (idempotent, quick once installed)
#   eval "$(scripts/install-nvcc.sh)"  # installs, then exports PATH in the current shell
#
# The pins matter: left unpinned, nvidia-nvvm resolves to a newer release whose PTX version the 13.0 ptxas
# rejects ("Unsupported .version"). No GPU and no driver are needed to compile.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${SPECDEC_NVCC_PREFIX:-$here/.cuda-toolchain}
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
stamp="$prefix/.installed"
bin="$prefix/nvidia/cu13/bin"

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${pins[*]}" || ! -x "$bin/nvcc" ]]; then
  python=${PYTHON:-$(command -v python3 || command -v python)}
  rm -rf "$prefix"
  mkdir -p "$prefix"
  echo "installing ${pins[*]} into $prefix" >&2
  "$python" -m pip install --quiet --disable-pip-version-check --no-compile --target "$prefix" "${pins[@]}" >&2
  # nvcc looks for its NVVM back end and headers relative to its own folder; the wheels put them in sibling
  # folders of one prefix, which is what nvcc expects, but ptxas and nvcc must be executable.
  chmod +x "$bin"/* "$prefix"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
  echo "${pins[*]}" >"$stamp"
fi

"$bin/nvcc" --version >/dev/null
echo "export PATH=\"$bin:\$PATH\""
