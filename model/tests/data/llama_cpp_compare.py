#!/usr/bin/env python3
"""Whole-file check of the dequantisers against llama.cpp (run by hand, not in CI).

Re-quantises the built-in SmolLM2-135M-Instruct file with llama.cpp to the common GGUF mixes
(which also write Q5_0/Q5_1/Q8_0/IQ4_NL for tensors whose rows are not a multiple of 256), runs
each file on this crate's f32 CPU model and on llama.cpp (CPU) for the same prompt tokens, and
compares the last position's logits. The source file itself is the baseline: what differs there
is the two engines' arithmetic (llama.cpp quantises activations to 8 bits for its dot products
and keeps the KV cache in f16), not the dequantisation. The last column compares ours with
numpy_reference.py (float64, weights dequantised by the `gguf` package) on the same file, which
isolates the dequantisation.

    pip install cmake ninja gguf numpy
    CMAKE_ARGS="-DGGML_NATIVE=OFF" MAKEFLAGS=-j2 pip install llama-cpp-python
    cargo build --release -p shadowkv-model --example cpu_logits
    python3 model/tests/data/llama_cpp_compare.py [SOURCE.gguf] [OUT_DIR]

SOURCE defaults to ~/.cache/shadowkv/SmolLM2-135M-Instruct.Q4_1.gguf (tools/setup.sh fetches
it), OUT_DIR to /tmp/shadowkv-requant. Prints a Markdown table; with llama-cpp-python 0.3.36
and gguf 0.19.0 on x86-64 (2 threads) it printed:

| file | tensor types | top-3 ours | top-3 llama.cpp | max abs diff | max abs / max abs logit | ‖Δ‖/‖llama.cpp‖ | ours vs numpy f64: ‖Δ‖/‖ref‖ |
|---|---|---|---|---|---|---|---|
| Q4_1 (source) | F32×61 Q4_1×210 Q8_0×1 | 253 (22.31), 260 (20.73), 354 (20.49) | 253 (22.13), 260 (20.46), 354 (20.36) | 0.8007 | 3.62e-02 | 5.02e-02 | 1.49e-06 |
| Q4_K_M | F32×61 Q4_K×16 Q5_0×166 Q6_K×14 Q8_0×15 | 253 (21.67), 260 (19.86), 354 (19.80) | 253 (21.67), 260 (20.11), 354 (19.98) | 0.9125 | 4.21e-02 | 5.38e-02 | 6.81e-07 |
| Q5_K_M | F32×61 Q5_1×166 Q5_K×16 Q6_K×14 Q8_0×15 | 253 (22.07), 354 (20.42), 260 (20.36) | 253 (22.46), 260 (20.83), 354 (20.75) | 0.9473 | 4.22e-02 | 5.44e-02 | 1.12e-06 |
| Q3_K_M | F32×61 Q4_0×120 Q4_K×29 Q5_0×58 Q5_1×2 Q5_K×1 Q8_0×1 | 253 (25.84), 354 (23.78), 260 (23.46) | 253 (25.97), 354 (24.02), 260 (23.70) | 0.8951 | 3.45e-02 | 3.26e-02 | 1.48e-06 |
| Q2_K | F32×61 Q3_K×30 Q4_0×180 Q8_0×1 | 253 (26.12), 260 (24.62), 3807 (24.48) | 253 (26.03), 260 (24.57), 354 (24.29) | 0.5155 | 1.98e-02 | 9.04e-03 | 8.85e-07 |
| IQ4_NL | F32×61 IQ4_NL×207 Q5_K×3 Q8_0×1 | 253 (22.34), 260 (21.84), 441 (20.76) | 253 (22.47), 260 (21.96), 441 (20.92) | 0.5540 | 2.47e-02 | 1.53e-02 | 4.91e-07 |
| IQ4_XS | F32×61 IQ4_NL×180 IQ4_XS×27 Q5_K×3 Q8_0×1 | 253 (22.59), 260 (22.12), 441 (21.07) | 253 (22.79), 260 (22.36), 441 (21.21) | 0.6216 | 2.73e-02 | 1.65e-02 | 5.42e-07 |

Every file agrees with the float64 reference to ~1e-6, and with llama.cpp about as well as the
untouched source does; the top-3 swaps are near-ties within llama.cpp's own spread. llama.cpp
wrote no Q2_K tensor here (SmolLM2's 576-wide rows fall back to Q4_0, its Q2_K mix puts Q3_K on
ffn_down), so Q2_K is covered by the known blocks alone.
"""
import collections
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import llama_cpp
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parents[3]
SOURCE = Path(sys.argv[1]) if len(sys.argv) > 1 else (
    Path.home() / ".cache/shadowkv/SmolLM2-135M-Instruct.Q4_1.gguf")
OUT_DIR = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/shadowkv-requant")
# The ChatML-shaped prompt of model/tests/cpu_model.rs.
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3510, 28, 7018, 411, 260, 1789,
          1018, 2, 198, 1, 4093, 198, 504, 3458, 282, 4649, 314]
MIXES = {
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    # Neither needs an importance matrix; they put IQ4_NL and IQ4_XS tensors in a whole file.
    "IQ4_NL": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "IQ4_XS": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS,
}


def requantise(name: str, ftype: int) -> Path:
    out = OUT_DIR / f"SmolLM2-135M-Instruct.{name}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        # The source is already quantised; llama.cpp refuses to re-quantise without this.
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(SOURCE).encode(), str(out).encode(),
                                            llama_cpp.byref(params))
        if rc != 0:
            sys.exit(f"llama_model_quantize to {name} failed ({rc})")
    return out


def tensor_types(path: Path) -> str:
    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return " ".join(f"{k}×{v}" for k, v in sorted(counts.items()))


def ours(path: Path) -> np.ndarray:
    out = OUT_DIR / (path.name + ".logits")
    env = dict(os.environ, SHADOWKV_GGUF=str(path), SHADOWKV_LOGITS_OUT=str(out))
    example = ROOT / "target/release/examples/cpu_logits"
    subprocess.run([str(example), *map(str, PROMPT)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return np.fromfile(out, dtype="<f4")


def numpy_reference(path: Path) -> np.ndarray:
    out = OUT_DIR / (path.name + ".f64")
    env = dict(os.environ, NUMPY_LOGITS_OUT=str(out))
    subprocess.run([sys.executable, str(Path(__file__).with_name("numpy_reference.py")),
                    str(path), *map(str, PROMPT)], env=env, check=True, stdout=subprocess.DEVNULL)
    return np.fromfile(out, dtype="<f8")


def llama(path: Path) -> np.ndarray:
    model = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                            verbose=False)
    model.eval(PROMPT)
    logits = np.array(model.scores[len(PROMPT) - 1], dtype=np.float32)
    model.close()
    return logits


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    files = [("Q4_1 (source)", SOURCE)] + [(n, requantise(n, f)) for n, f in MIXES.items()]
    print("| file | tensor types | top-3 ours | top-3 llama.cpp | max abs diff | "
          "max abs / max abs logit | ‖Δ‖/‖llama.cpp‖ | ours vs numpy f64: ‖Δ‖/‖ref‖ |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in files:
        a, b, c = ours(path), llama(path), numpy_reference(path)
        assert a.shape == b.shape == c.shape, (a.shape, b.shape, c.shape)
        top = lambda x: ", ".join(f"{i} ({x[i]:.2f})" for i in np.argsort(-x)[:3])
        diff = np.abs(a - b)
        print(f"| {name} | {tensor_types(path)} | {top(a)} | {top(b)} | {diff.max():.4f} | "
              f"{diff.max() / np.abs(b).max():.2e} | "
              f"{np.linalg.norm(a - b) / np.linalg.norm(b):.2e} | "
              f"{np.linalg.norm(a - c) / np.linalg.norm(c):.2e} |", flush=True)

if __name__ == "__main__":
    main()
