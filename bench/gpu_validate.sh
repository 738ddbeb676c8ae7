#!/usr/bin/env bash
# One device call that checks a tree written without a GPU (issue 13; run
# whole in sessions 15 and 16's next): the whole CUDA test suite (kernels,
# executor, moe-run checks), memcheck over the wgmma weight gradient, the
# fused backwards and every forward tile on the staged store. Timings come
# from the scripts beside it (bench/gpu_quick_staged.sh, ...), in a call of
# their own. Everything it writes is also packed into
# $OUT/validate.tgz (a call brings back few files). Plans from
# bench/make_baseline.sh; run inside bench/baseline:
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> bash bench/gpu_validate.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
device_call validate -- moe-run flex-gemm-bench FlexCudaKernelsTests FlexCudaExecutorTests
K="$B/unittests/Cuda/FlexCudaKernelsTests"
timeout 330 stdbuf -oL "$K" > "$LOGS/kernels.log" 2>&1
echo "FlexCudaKernelsTests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/kernels.log" | tr '\n' ' ')" \
     "$(grep -E '^\[ RUN' "$LOGS/kernels.log" | tail -1)"
grep -E '^\[  FAILED' "$LOGS/kernels.log" | cut -c1-140 | head
timeout 240 "$B/unittests/Cuda/FlexCudaExecutorTests" > "$LOGS/executor.log" 2>&1
echo "FlexCudaExecutorTests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/executor.log" | tr '\n' ' ')"
(cd "$B" && timeout 150 ctest -R 'moe-run.cuda' --output-on-failure) > "$LOGS/ctest.log" 2>&1
echo "moe-run checks: exit $? $(grep -E 'tests passed|tests failed' "$LOGS/ctest.log")"
timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$K" \
  --gtest_filter='Tiles/CudaHopperWgradTiles.*:*ActivationBackwardMatches*/prefill_many_rows:*GluBackwardMatches*/prefill_many_rows:CudaDeviceGemmTiles.*:*EpilogueMatchesFp64OnBothPaths/*' \
  > "$LOGS/memcheck.log" 2>&1
echo "memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1))"
echo "tests done at ${SECONDS}s"
echo "done at ${SECONDS}s"
