#!/usr/bin/env bash
# Profiles one launch of a kernel inside the decode bench with Nsight Compute (full set) and
# prints its details page; the SASS source page with stall samples goes to a CSV beside it.
#   [SHADOWKV_BENCH_ONLY=b1_ctx122880] tools/profile/ncu-kernel.sh NAME KERNEL_REGEX BENCH_FILTER [SKIP]
# Needs $OUT (the device tool's output folder) and gpu-bundle/ built by tools/gpu-bundle.
set -euo pipefail
name=$1 kernel=$2 filter=$3 skip=${4:-1000}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
ncu --clock-control none -k "regex:$kernel" --launch-skip "$skip" --launch-count 1 --set full \
  --warp-sampling-interval 0 \
  -f -o "$OUT/$name" gpu-bundle/benches/decode --bench "$filter" > "$OUT/$name.run.log" 2>&1
ncu -i "$OUT/$name.ncu-rep" --page details > "$OUT/$name.details.txt"
ncu -i "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/$name.sass.csv" 2>&1 || true
