"""PyTorch SDPA decode at the shapes of the attention and decode benches: the peer to beat.

One query token per sequence, Llama-3-8B heads (32 query, 8 KV, d 128), bf16, K/V contiguous
[batch, kv_heads, tokens, d]. Prints per-layer time (CUDA-event median of 20 launches), the bytes
read per second, and the device-to-device copy ceiling measured in the same run.

    python3 benches/peers/sdpa_decode.py [--json OUT.json]
"""
import argparse
import json
import warnings

import torch
import torch.nn.functional as F


def median_ms(fn, repeats=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_ceiling():
    source = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), repeats=10)
    return 2 * source.numel() * 2 / (ms * 1e-3)


def pinned_ceiling():
    source = torch.randn(256 << 20, dtype=torch.bfloat16).pin_memory()
    target = torch.empty(source.shape, dtype=source.dtype, device="cuda")
    ms = median_ms(lambda: target.copy_(source, non_blocking=True), repeats=10)
    return source.numel() * 2 / (ms * 1e-3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    # The flash backend warns that it broadcasts the KV heads itself (enable_gqa).
    warnings.filterwarnings("ignore", message="For dense input")
    heads, kv_heads, d = 32, 8, 128
    copy = copy_ceiling()
    pinned = pinned_ceiling()
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; ceilings now: device copy "
          f"{copy / 1e9:.0f} GB/s (read + write), pinned host->device {pinned / 1e9:.1f} GB/s")
    rows = []
    print(f"{'batch':>5} {'tokens':>8} {'backend':>10} {'us':>9} {'GB/s':>7} {'of copy':>8}")
    for batch, tokens in [(1, 2048), (1, 32768), (1, 131072), (4, 32768), (4, 131072),
                          (16, 32768), (16, 122880), (16, 131072)]:
        q = torch.randn(batch, heads, 1, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(batch, kv_heads, tokens, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(batch, kv_heads, tokens, d, dtype=torch.bfloat16, device="cuda")
        kv_bytes = 2 * k.numel() * 2
        backends = {
            "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
            "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
        }
        for label, backend in backends.items():
            try:
                with torch.nn.attention.sdpa_kernel(backend):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            except RuntimeError as error:
                print(f"{batch:>5} {tokens:>8} {label:>10} unavailable: {str(error).splitlines()[0][:80]}")
                continue
            rate = kv_bytes / (ms * 1e-3)
            rows.append(dict(batch=batch, tokens=tokens, backend=label, us=ms * 1e3,
                             bytes_per_s=rate, copy_bytes_per_s=copy))
            print(f"{batch:>5} {tokens:>8} {label:>10} {ms * 1e3:>9.1f} {rate / 1e9:>7.0f} "
                  f"{100 * rate / copy:>7.1f}%")
        del q, k, v
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(device=name, copy_bytes_per_s=copy, pinned_bytes_per_s=pinned,
                           rows=rows), file, indent=1)


if __name__ == "__main__":
    main()
