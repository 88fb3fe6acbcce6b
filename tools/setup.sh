#!/usr/bin/env bash
# Installs what a fresh machine lacks to build the kernels: the Rust standard library sources
# (rust-src, for -Zbuild-std=core on nvptx64) and ptxas (PyPI nvidia-cuda-nvcc), linked onto
# PATH next to cargo so the build checks every kernel for spills. Idempotent.
set -euo pipefail
rustup component add rust-src
ptxas_version=13.0.88
if ! command -v ptxas >/dev/null 2>&1; then
  if python3 -m pip install -q --disable-pip-version-check "nvidia-cuda-nvcc==${ptxas_version}" 2>/dev/null; then
    ptxas=$(python3 - <<'PY'
import os, nvidia
for root in nvidia.__path__:
    candidate = os.path.join(root, "cu13", "bin", "ptxas")
    if os.path.isfile(candidate):
        print(candidate)
        break
PY
)
    if [ -n "$ptxas" ]; then
      bin=$(dirname "$(command -v cargo)")
      ln -sf "$ptxas" "$bin/ptxas"
      echo "ptxas: linked $ptxas into $bin"
    fi
  else
    echo "warning: could not install nvidia-cuda-nvcc==${ptxas_version}; kernels build but are not checked for spills" >&2
  fi
fi
command -v ptxas >/dev/null 2>&1 && ptxas --version | tail -1 || true
