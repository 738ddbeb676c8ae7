#!/usr/bin/env bash
# One device call that checks a tree written without a GPU (issue 13,
# session 15's first call): the whole CUDA test suite (kernels, executor,
# moe-run checks), memcheck over the wgmma weight gradient and the fused
# backwards, then C3 / G3 training rows for the fused backwards' auto rule
# and the weight gradient's tile (FLEX_WGMMA=0 against the default, named
# variants); the aligned blocks on cuBLASLt's pointer arrays
# (flex-gemm-bench). Everything it writes is also packed into
# $OUT/validate.tgz (a call brings back few files). Plans from
# bench/make_baseline.sh; run inside bench/baseline:
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> bash bench/gpu_validate.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; B="${BUILD:-/tmp/bv}"; LOGS=/tmp/validate
mkdir -p "$OUT" "$LOGS"
# The log also goes straight to $OUT: a call cut at its time limit still
# brings it back (the tgz is written on exit).
exec > >(tee "$LOGS/validate-log.txt" "$OUT/validate-log.txt") 2>&1
trap 'tar czf "$OUT/validate.tgz" -C "$LOGS" . 2>/dev/null' EXIT
echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
(cmake -S . -B "$B" -G Ninja -DFLEX_ENABLE_COMPILER=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
   -DCMAKE_BUILD_TYPE=Release > /dev/null &&
 ninja -C "$B" moe-run flex-gemm-bench FlexCudaKernelsTests FlexCudaExecutorTests > "$LOGS/build.log" 2>&1) ||
  { echo "build FAILED"; tail -20 "$LOGS/build.log"; exit 1; }
echo "built at ${SECONDS}s"
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
  --gtest_filter='Tiles/CudaHopperWgradTiles.*:*ActivationBackwardMatches*/prefill_many_rows:*GluBackwardMatches*/prefill_many_rows' \
  > "$LOGS/memcheck.log" 2>&1
echo "memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1))"
echo "tests done at ${SECONDS}s"
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
row() { moe_run_row "$1" "$2" "$3" "${@:4}" -- --train; } # label plan variant [env...]
for w in 1 0; do
  row c3d-single-w$w c3_dropless.train single FLEX_WGMMA=$w
  row c3d-act-w$w c3_dropless.train single+act_backward FLEX_WGMMA=$w
  row c3cap1-act-w$w c3_cap1.train single+act_backward FLEX_WGMMA=$w
  row g3d-glu-act-w$w g3_dropless.train single+glu+act_backward FLEX_WGMMA=$w
done
row c3d-single-device c3_dropless.train single FLEX_GROUPED_GEMM=device
# Workspaces per variant on the device: auto over the C3 dropless layouts
# with the own workspace bounded to 2 GiB (padded's 14.8 left out; the
# ragged and aligned ones explored), then padded alone (the whole).
ROW_ITERS=20 row c3d-layouts-auto-2g c3_dropless_layouts.train auto FLEX_MAX_WORKSPACE_MIB=2048
row c3d-layouts-padded c3_dropless_layouts.train padded
# The aligned layout's blocks: cublasGemmBatchedEx against cuBLASLt's
# pointer-array matmul and its heuristic's algorithms, beside the padded batch.
timeout 120 "$B/bin/flex-gemm-bench" --iters 10 --only c3_random > "$LOGS/gemm-bench.log" 2>&1
echo "flex-gemm-bench c3_random: exit $?"; grep -E "aligned|padded" "$LOGS/gemm-bench.log"
echo "done at ${SECONDS}s"
