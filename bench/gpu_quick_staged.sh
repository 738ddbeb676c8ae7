#!/usr/bin/env bash
# A short device call (issue 13; written in session 16, not yet run: no
# device time was left): the staged store without 3f2354c's serialized
# wgmmas, against the direct store and other raster bands on C3
# (flex-gemm-bench), then dropless layers with the grouped GEMM on cuBLAS
# per expert (auto's rule above 512 rows per expert) against the device
# kernel. No tests: run bench/gpu_validate.sh first. The log goes to $OUT
# as it runs; everything else into $OUT/quick.tgz (a call brings back few
# files). Run inside bench/baseline (bench/make_baseline.sh):
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> bash bench/gpu_quick_staged.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
device_call quick -DFLEX_ENABLE_TESTS=OFF -- flex-gemm-bench moe-run
G="$B/bin/flex-gemm-bench"
bench() { # label only [env...]
  local label=$1 only=$2; shift 2
  env "$@" timeout 100 "$G" --iters 10 --only "$only" > "$LOGS/gemm-$label.log" 2>&1
  echo "== $label (exit $?)"
  grep -E "^c3|wgmma|bias" "$LOGS/gemm-$label.log" | sed -E 's/small.*wide 128x256 [0-9.]+ us \([0-9]+ TF\/s\)//' | cut -c1-300
}
bench staged c3
bench direct c3 FLEX_WGMMA_STORE=direct
bench raster4 c3 FLEX_WGMMA_RASTER=4
bench raster16 c3 FLEX_WGMMA_RASTER=16
bench staged-random c3_random
echo "bench done at ${SECONDS}s"
# Layers: is the device kernel (no host read, graph-capturable) now faster
# than cuBLAS per expert above kWgmmaForwardRowsPerExpert (512 rows)?
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
for mode in auto device; do
  moe_run_row c3d-$mode c3_dropless.infer single FLEX_GROUPED_GEMM=$mode
  moe_run_row c3d-train-$mode c3_dropless.train single FLEX_GROUPED_GEMM=$mode -- --train
  moe_run_row g3d-$mode g3_dropless_layouts.infer ragged+glu FLEX_GROUPED_GEMM=$mode
  moe_run_row c1d-$mode c1_dropless.infer single FLEX_GROUPED_GEMM=$mode
done
moe_run_row c3d-aligned c3_dropless_layouts.infer aligned
moe_run_row c3d-padded c3_dropless_layouts.infer padded
moe_run_row c3cap1 c3_cap1.infer single
moe_run_row g3d-aligned+glu g3_dropless_layouts.infer aligned+glu
moe_run_row d1-auto d1_dropless.infer auto
echo "rows done at ${SECONDS}s"
# The decode layers per kernel (Nsight Compute; each kernel's duration and
# DRAM read, clocks as they run): what the router, gate, dispatch and
# combine steps' event times hold, and each GEMM against its weight bytes.
decode_profile() { # label plan variant
  timeout 120 ncu --clock-control none --csv \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum \
    "$B/bin/moe-run" "bench/plans/$2.json" --device cuda --iters 3 \
    --variant "$3" > "$LOGS/ncu-$1.csv" 2>&1
  echo "== ncu $1 ($3, exit $?; 1 warm-up + 3 forwards)"
  python3 bench/ncu_kernel_table.py "$LOGS/ncu-$1.csv" 4
}
decode_profile d1 d1_dropless_layouts.infer ragged+gather
decode_profile d1-ragged d1_dropless_layouts.infer ragged
decode_profile d2 d2_dropless_layouts.infer ragged+glu
# D1's two wgmma GEMMs (ragged: neither gathered) against the DRAM: how
# near the copy's bandwidth, and what stalls.
timeout 150 ncu --clock-control none --kernel-name regex:raggedM --launch-count 4 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
  --section LaunchStats --section Occupancy \
  "$B/bin/moe-run" bench/plans/d1_dropless_layouts.infer.json --device cuda \
  --iters 1 --variant ragged > "$LOGS/ncu-d1-gemm.txt" 2>&1
echo "== ncu d1 gemm sections (exit $?)"
grep -E "raggedM|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|L2 Cache Throughput|Grid Size|Registers|Waves|Stall|Achieved Occ" \
  "$LOGS/ncu-d1-gemm.txt" | cut -c1-150 | head -60
echo "done at ${SECONDS}s"
