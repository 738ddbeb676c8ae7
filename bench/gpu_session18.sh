#!/usr/bin/env bash
# The device calls written in session 18 (issue 13; its device was paused
# before any ran), in three parts on one warm machine (BUILD=/tmp/gb keeps
# the build between them; each part fits one call). First `git revert
# b5ca77d` (the A boxes of 32 rows, reverted until a GPU runs them; else
# both A rows time the same code), then bench/make_baseline.sh.
#   PART=tests: builds, then the tests of what no GPU has run yet - the
#     routed lane gate (GatePath::Lanes), the router's last-split sum and
#     tiles, the wgmma forward with A in 32-row boxes, the fused stores
#     (a79e74b), the same kernels with dependent launches (FLEX_PDL=1), the
#     moe-run.cuda checks (two with FLEX_PDL=1) - and memcheck over them.
#   PART=decode: flex-gate-bench (lanes against lane-scan, the router's
#     forms and tiles), the decode GEMMs with A's boxes against
#     FLEX_WGMMA_A=full, and D1 / D2 under auto with each new form.
#   PART=bench: flex-gemm-bench's C3 (the fused stores), the prefill layers
#     under the new rules and D1 per kernel (ncu).
# Run inside bench/baseline (bench/make_baseline.sh):
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> BUILD=/tmp/gb PART=tests bash bench/gpu_session18.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
device_call "s18-${PART:-tests}" -DFLEX_ENABLE_TESTS=ON -- flex-gemm-bench moe-run FlexCudaKernelsTests flex-gate-bench
K="$B/unittests/Cuda/FlexCudaKernelsTests"
G="$B/bin/flex-gemm-bench"
if [[ ${PART:-tests} == tests ]]; then
  timeout 120 "$K" --gtest_filter='*CudaGate*:*CudaRouter*' > "$LOGS/gate.log" 2>&1
  echo "gate and router tests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/gate.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED|Failure|Expected|Which is|slot|T [0-9]+, pattern' "$LOGS/gate.log" | cut -c1-160 | head -20
  FUSED='CudaDeviceGemmTiles.EveryTileMatchesFp64:*Epilogue*:*ActivationBackward*:*GluBackward*:*GluMatches*:*CudaDeviceGemm*:*CudaHopper*'
  timeout 140 "$K" --gtest_filter="$FUSED" > "$LOGS/kernels.log" 2>&1
  echo "wgmma / fused-store tests: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/kernels.log" | tr '\n' ' ') last: $(grep -E '^\[ RUN' "$LOGS/kernels.log" | tail -1 | cut -c1-90)"
  grep -E '^\[  FAILED' "$LOGS/kernels.log" | cut -c1-140 | head
  FLEX_PDL=1 timeout 90 "$K" --gtest_filter='*CudaGate*:*CudaRouter*:*CudaDeviceGemm*:*Combine*' > "$LOGS/pdl.log" 2>&1
  echo "the same with dependent launches (FLEX_PDL=1): exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/pdl.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED' "$LOGS/pdl.log" | cut -c1-140 | head
  (cd "$B" && timeout 90 ctest -R 'moe-run.cuda' --output-on-failure > "$LOGS/moe-run-ctest.log" 2>&1)
  echo "ctest moe-run.cuda (pdl included): exit $? $(grep -E 'tests passed|tests failed' "$LOGS/moe-run-ctest.log")"
  echo "tests done at ${SECONDS}s"
  timeout 90 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$K" \
    --gtest_filter='*CudaGatePaths.MatchTheCpuGate/E64_k6*:*CudaRouter*:*EpilogueMatchesFp64OnBothPaths/*:*ActivationBackwardMatches*/decode_ragged:CudaDeviceGemmTiles.EveryTileMatchesFp64' \
    > "$LOGS/memcheck.log" 2>&1
  echo "memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1); $(grep -cE '^\[       OK' "$LOGS/memcheck.log") ok)"
  echo "done at ${SECONDS}s"
  exit 0
fi
if [[ $PART == decode ]]; then
  timeout 120 "$B/bin/flex-gate-bench" --iters 25 > "$LOGS/gate-bench.log" 2>&1
  echo "== flex-gate-bench (exit $?)"
  sed -n '/^shape (us)/,/^$/p' "$LOGS/gate-bench.log" | head -20
  sed -n '/^router,/,$p' "$LOGS/gate-bench.log" | head -8
  for tt in 8 16; do
    FLEX_ROUTER_TILE_TOKENS=$tt timeout 30 "$B/bin/flex-gate-bench" --router-only --iters 50 \
      > "$LOGS/router-tile$tt.log" 2>&1
    echo "== router, $tt tokens a block (exit $?)"
    sed -n '/^router,/,$p' "$LOGS/router-tile$tt.log" | head -8
  done
  grep -A6 "^decode T256 E64 k6 (" "$LOGS/gate-bench.log" | cut -c1-200
  for a in boxes full; do
    FLEX_WGMMA_A=$a timeout 40 "$G" --iters 20 --only decode_t256,decode_t128_big > "$LOGS/gemm-decode-$a.log" 2>&1
    echo "== flex-gemm-bench decode, A $a (exit $?)"
    grep -E "^decode|wgmma 128x256|glu|gathered" "$LOGS/gemm-decode-$a.log" | cut -c1-260
  done
  . bench/moe_run_row.sh
  MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
  moe_run_row d1 d1_dropless.infer auto -- --graph
  moe_run_row d1-fullA d1_dropless.infer auto FLEX_WGMMA_A=full -- --graph
  moe_run_row d1-routed d1_dropless.infer auto FLEX_GATE_ROUTE=last-block FLEX_ROUTER_SUM=last-split -- --graph
  moe_run_row d1-routed-tt16 d1_dropless.infer auto FLEX_GATE_ROUTE=last-block FLEX_ROUTER_SUM=last-split FLEX_ROUTER_TILE_TOKENS=16 -- --graph
  moe_run_row d1-pdl d1_dropless.infer auto FLEX_PDL=1 -- --graph
  moe_run_row d1-all d1_dropless.infer auto FLEX_PDL=1 FLEX_GATE_ROUTE=last-block FLEX_ROUTER_SUM=last-split FLEX_ROUTER_TILE_TOKENS=16 -- --graph
  moe_run_row d2-pdl d2_dropless.infer auto FLEX_PDL=1 -- --graph
  moe_run_row d2 d2_dropless.infer auto -- --graph
  moe_run_row d2-fullA d2_dropless.infer auto FLEX_WGMMA_A=full -- --graph
  echo "done at ${SECONDS}s"
  exit 0
fi
timeout 100 "$G" --iters 10 --only c3 > "$LOGS/gemm-c3.log" 2>&1
echo "== flex-gemm-bench c3 (exit $?)"
grep -E "^c3|wgmma 128x256|bias|backward" "$LOGS/gemm-c3.log" | sed -E 's/small.*wide 128x256 [0-9.]+ us \([0-9]+ TF\/s\)//' | cut -c1-300
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
moe_run_row c3cap1 c3_cap1.infer single
moe_run_row c3d c3_dropless.infer single
moe_run_row c3d-graph c3_dropless.infer single -- --graph
moe_run_row c3d-train c3_dropless.train single -- --train
moe_run_row c3cap1-train c3_cap1.train single -- --train
moe_run_row g3d g3_dropless_layouts.infer ragged+glu
moe_run_row g3d-aligned g3_dropless_layouts.infer aligned+glu
moe_run_row c1d c1_dropless.infer single
moe_run_row c1cap1 c1_cap1.infer single
echo "rows done at ${SECONDS}s"
# D1 per kernel (as Run 43's table: ragged+gather, 1 warm-up + 3 forwards).
timeout 120 ncu --clock-control none --csv \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum \
  "$B/bin/moe-run" bench/plans/d1_dropless_layouts.infer.json --device cuda --iters 3 \
  --variant ragged+gather > "$LOGS/ncu-d1.csv" 2>&1
echo "== ncu d1 per kernel (exit $?)"
python3 bench/ncu_kernel_table.py "$LOGS/ncu-d1.csv" 4
echo "done at ${SECONDS}s"
