#!/usr/bin/env bash
# One device call for the wgmma kernel's staged store (issue 13, session 16's
# second call): the GEMM tests (kernels and executor) and memcheck over the
# tiles, then flex-gemm-bench on C3 with the staged store (default), the
# direct one (FLEX_WGMMA_STORE=direct) and other raster bands
# (FLEX_WGMMA_RASTER), then layer rows on the device kernel. Plans from
# bench/make_baseline.sh; run inside bench/baseline:
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> bash bench/gpu_staged.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
device_call staged -- moe-run flex-gemm-bench FlexCudaKernelsTests FlexCudaExecutorTests
K="$B/unittests/Cuda/FlexCudaKernelsTests"
GEMMS='*CudaDeviceGemm*:*CudaGemmCombine*:*CudaAlignedGemm*:*CudaHopper*:*CudaGroupedGemm*:*CudaStaticGemm*'
timeout 200 "$K" --gtest_filter="$GEMMS" > "$LOGS/kernels.log" 2>&1
echo "GEMM tests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/kernels.log" | tr '\n' ' ')"
grep -E '^\[  FAILED' "$LOGS/kernels.log" | cut -c1-160 | head
timeout 120 "$B/unittests/Cuda/FlexCudaExecutorTests" > "$LOGS/executor.log" 2>&1
echo "FlexCudaExecutorTests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/executor.log" | tr '\n' ' ')"
timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$K" \
  --gtest_filter='CudaDeviceGemmTiles.*:*EpilogueMatchesFp64OnBothPaths/*:*ForwardMatchesFp64OnBothPaths/many*' \
  > "$LOGS/memcheck.log" 2>&1
echo "memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1))"
echo "tests done at ${SECONDS}s"
G="$B/bin/flex-gemm-bench"
bench() { # label [env...]
  local label=$1; shift
  env "$@" timeout 150 "$G" --iters 10 --only c3,c3_random > "$LOGS/gemm-$label.log" 2>&1
  echo "== $label (exit $?)"
  grep -E "^c3|wgmma|aligned|padded|bias" "$LOGS/gemm-$label.log" | cut -c1-330
}
bench staged
bench direct FLEX_WGMMA_STORE=direct
bench raster4 FLEX_WGMMA_RASTER=4
bench raster16 FLEX_WGMMA_RASTER=16
echo "bench done at ${SECONDS}s"
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
row() { moe_run_row "$@"; }
row c3d-infer c3_dropless.infer single
row c3d-infer-device c3_dropless.infer single FLEX_GROUPED_GEMM=device
row c3d-aligned c3_dropless_layouts.infer aligned
row c3d-padded c3_dropless_layouts.infer padded
row c3cap1-infer c3_cap1.infer single
row g3d-aligned+glu g3_dropless_layouts.infer aligned+glu
row g3d-ragged+glu g3_dropless_layouts.infer ragged+glu
row g3d-ragged+glu-direct g3_dropless_layouts.infer ragged+glu FLEX_WGMMA_STORE=direct
row d1-auto d1_dropless.infer auto
row c3d-train-device c3_dropless.train single FLEX_GROUPED_GEMM=device -- --train
echo "done at ${SECONDS}s"
