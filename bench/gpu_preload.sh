#!/usr/bin/env bash
# One device call (issue 13, session 17): the staged store's inputs loaded
# before its staging writes (a79e74b), auto's device-kernel bound at 2048
# rows per expert (7b81a8d) and A in boxes of 32 rows (4707569, against
# FLEX_WGMMA_A=full at decode; reverted in 42284b7 until a GPU runs it:
# `git revert 42284b7` first, else both A rows time the same code). The tests of the fused stores and the device
# GEMM (the new past-2048 case included), memcheck over the fused stores,
# flex-gemm-bench on C3 (bias + ReLU and the ReLU backward fused against
# GEMM + pass), then the dropless layers under auto against capacity 1.0.
# Log to $OUT as it runs, the rest in $OUT/preload.tgz. Run inside
# bench/baseline (bench/make_baseline.sh):
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> bash bench/gpu_preload.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
device_call preload -DFLEX_ENABLE_TESTS=ON -- flex-gemm-bench moe-run FlexCudaKernelsTests
K="$B/unittests/Cuda/FlexCudaKernelsTests"
FUSED='*Epilogue*:*ActivationBackward*:*GluBackward*:*CudaDeviceGemm*:*CudaHopper*'
timeout 170 "$K" --gtest_filter="$FUSED" > "$LOGS/kernels.log" 2>&1
echo "fused-store and device GEMM tests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/kernels.log" | tr '\n' ' ')"
grep -E '^\[  FAILED' "$LOGS/kernels.log" | cut -c1-140 | head
timeout 120 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$K" \
  --gtest_filter='*EpilogueMatchesFp64OnBothPaths/*:*ActivationBackwardMatches*/prefill_many_rows:*ActivationBackwardMatches*/decode_ragged' \
  > "$LOGS/memcheck.log" 2>&1
echo "memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1))"
echo "tests done at ${SECONDS}s"
G="$B/bin/flex-gemm-bench"
timeout 100 "$G" --iters 10 --only c3 > "$LOGS/gemm-c3.log" 2>&1
echo "== flex-gemm-bench c3 (exit $?)"
grep -E "^c3|wgmma 128x256|bias|backward" "$LOGS/gemm-c3.log" | sed -E 's/small.*wide 128x256 [0-9.]+ us \([0-9]+ TF\/s\)//' | cut -c1-300
for a in boxes full; do
  FLEX_WGMMA_A=$a timeout 60 "$G" --iters 20 --only decode_t256,decode_t128_big > "$LOGS/gemm-decode-$a.log" 2>&1
  echo "== flex-gemm-bench decode, A $a (exit $?)"
  grep -E "^decode|wgmma 128x256|glu|gathered" "$LOGS/gemm-decode-$a.log" | cut -c1-260
done
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
moe_run_row c3cap1 c3_cap1.infer single
moe_run_row c3d c3_dropless.infer single
moe_run_row c3d-gather c3_dropless.infer single+gather
moe_run_row c3d-graph c3_dropless.infer single -- --graph
moe_run_row c3d-train c3_dropless.train single -- --train
moe_run_row c3d-train-act c3_dropless.train single+act_backward -- --train
moe_run_row c3cap1-train c3_cap1.train single -- --train
moe_run_row g3d g3_dropless_layouts.infer ragged+glu
moe_run_row g3d-aligned g3_dropless_layouts.infer aligned+glu
moe_run_row c1d c1_dropless.infer single
moe_run_row c1cap1 c1_cap1.infer single
moe_run_row d1 d1_dropless.infer auto -- --graph
moe_run_row d1-fullA d1_dropless.infer auto FLEX_WGMMA_A=full -- --graph
moe_run_row d1-ragged d1_dropless_layouts.infer ragged
moe_run_row d2 d2_dropless.infer auto -- --graph
moe_run_row d2-fullA d2_dropless.infer auto FLEX_WGMMA_A=full -- --graph
# D1's gate and router kernels: what a few-microsecond kernel waits on.
timeout 60 ncu --clock-control none --kernel-name regex:'gate|router|location' --launch-count 6 \
  --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
  "$B/bin/moe-run" bench/plans/d1_dropless.infer.json --device cuda --iters 1 --variant auto \
  > "$LOGS/ncu-d1-gate.txt" 2>&1
echo "== ncu d1 gate sections (exit $?)"
grep -E "^  [a-zA-Z_:<>]*(gate|router|location)|Duration|Elapsed Cycles|Stall|Warp Cycles Per Issued|Achieved Occ|Registers Per" \
  "$LOGS/ncu-d1-gate.txt" | cut -c1-150 | head -60
echo "done at ${SECONDS}s"
