#!/usr/bin/env bash
# The nineteenth session's device calls (issue 13), each one call:
#   PART=verify: builds, then what no GPU has run since 3a18f8c - the gate
#     and router tests (Auto's routed lane gate up to 2048 pairs, the
#     router's last-split sum, the 16-token tile's fix), the moe-run.cuda
#     checks, memcheck over the gate and router, the decode GEMMs and D1
#     with raster bands of 1 M tile; then (unless TABLE=0) the goal table
#     of D1, D2 and C3 in what is left of the call.
#   PART=table: the goal table (bench/gpu_run.sh: PyTorch's layer, the
#     GEMMs alone, Flex eager and as a graph, the chart) for TABLE_CONFIGS
#     (default "c1 c2 g1"), on moe-run built here (no full build,
#     no ctest: PART=verify ran the tests).
# Run inside bench/baseline (bench/make_baseline.sh):
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> BUILD=/tmp/gb PART=verify bash bench/gpu_session19.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
# goal_table CONFIGS: bench/gpu_run.sh on the moe-run built here, ending
# by the call's 565th second; its results, chart and log in $OUT/table.
goal_table() {
  BENCH_SKIP="build ctest" BENCH_BUILD_DIR="$B" BENCH_ITERS="${TABLE_ITERS:-20}" \
    BENCH_CONFIGS="$1" BENCH_DEADLINE=$((565 - SECONDS)) \
    OUT="$OUT/table" bash bench/gpu_run.sh > "$LOGS/table.log" 2>&1
  echo "gpu_run.sh ($1): exit $?"
  tail -40 "$LOGS/table.log"
  echo "done at ${SECONDS}s"
}
if [[ ${PART:-verify} == table ]]; then
  device_call "s19-table" -- moe-run
  goal_table "${TABLE_CONFIGS:-c1 c2 g1}"
  exit 0
fi
device_call "s19-verify" -DFLEX_ENABLE_TESTS=ON -- moe-run FlexCudaKernelsTests flex-gemm-bench
K="$B/unittests/Cuda/FlexCudaKernelsTests"
timeout 120 "$K" --gtest_filter='*CudaGate*:*CudaRouter*' > "$LOGS/gate.log" 2>&1
echo "gate and router tests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/gate.log" | tr '\n' ' ')"
grep -E '^\[  FAILED|Failure|Expected|Which is' "$LOGS/gate.log" | cut -c1-160 | head -20
(cd "$B" && timeout 120 ctest -R 'moe-run.cuda' --output-on-failure > "$LOGS/moe-run-ctest.log" 2>&1)
echo "ctest moe-run.cuda: exit $? $(grep -E 'tests passed|tests failed' "$LOGS/moe-run-ctest.log")"
grep -E 'Failed|\*\*\*' "$LOGS/moe-run-ctest.log" | head -8
timeout 60 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$K" \
  --gtest_filter='*CudaGatePaths.MatchTheCpuGate/E64_k6*:*CudaGatePathLimits*:*CudaRouterFewTokens*' \
  > "$LOGS/memcheck.log" 2>&1
echo "memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1); $(grep -cE '^\[       OK' "$LOGS/memcheck.log") ok)"
echo "tests done at ${SECONDS}s"
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
# The decode GEMMs with raster bands of 1 M tile (each expert's column
# tiles on CTAs running together: the same rows of B) against 8.
for r in 8 1; do
  FLEX_WGMMA_RASTER=$r timeout 40 "$B/bin/flex-gemm-bench" --iters 20 --only decode_t256,decode_t128_big \
    > "$LOGS/gemm-decode-r$r.log" 2>&1
  echo "== flex-gemm-bench decode, raster $r (exit $?)"
  grep -E "^decode|wgmma 128x256|glu|gathered" "$LOGS/gemm-decode-r$r.log" | cut -c1-240
done
moe_run_row d1-raster1 d1_dropless.infer auto FLEX_WGMMA_RASTER=1 -- --graph
moe_run_row d1 d1_dropless.infer auto -- --graph
echo "rows done at ${SECONDS}s"
[[ ${TABLE:-1} == 1 ]] && goal_table "${TABLE_CONFIGS:-d1 d2 c3}"
