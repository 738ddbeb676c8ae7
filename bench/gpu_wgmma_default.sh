#!/usr/bin/env bash
# The wgmma kernel on by default (session 14): the executor tests and the
# moe-run device checks with the new defaults; the weight gradient's tiles
# on the training shapes (flex-gemm-bench); layers eager with the auto
# variant, FLEX_WGMMA=0 against the default, in one call. Plans from
# bench/make_baseline.sh; run inside bench/baseline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; B="${BUILD:-/tmp/bg}"
mkdir -p "$OUT"
exec > >(tee "$OUT/wgmma-default-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
(cmake -S . -B "$B" -G Ninja -DFLEX_ENABLE_COMPILER=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
   -DCMAKE_BUILD_TYPE=Release > /dev/null &&
 ninja -C "$B" moe-run flex-gemm-bench FlexCudaExecutorTests > "$OUT/build.log" 2>&1) ||
  { echo "build FAILED"; tail -20 "$OUT/build.log"; exit 1; }
echo "built at ${SECONDS}s"
timeout 240 "$B/unittests/Cuda/FlexCudaExecutorTests" > "$OUT/executor.log" 2>&1
echo "FlexCudaExecutorTests: exit $? $(grep -E '^\[  (PASSED|FAILED)|tests ran' "$OUT/executor.log" | tr '\n' ' ')"
grep -E '^\[  FAILED' "$OUT/executor.log" | cut -c1-140 | head
(cd "$B" && timeout 150 ctest -R 'moe-run.cuda' --output-on-failure) > "$OUT/ctest.log" 2>&1
echo "moe-run checks: exit $? $(grep -E 'tests passed|tests failed' "$OUT/ctest.log")"
grep -E "\*\*\*|Failed" "$OUT/ctest.log" | head
echo "tests done at ${SECONDS}s"
timeout 120 "$B/bin/flex-gemm-bench" --iters 10 --only c1,c3_skewed,train_e64_r32,train_e16_r64 \
  > "$OUT/gemm-bench.log" 2>&1
echo "flex-gemm-bench: exit $?"; grep -E -A1 "^(c1|c3_skewed|train_e64_r32|train_e16_r64) +wgrad" "$OUT/gemm-bench.log" | cut -c1-330
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$OUT" ROW_ITERS=20
row() { moe_run_row "$1" "$2" auto FLEX_WGMMA="$3" -- "${@:4}"; } # label plan wgmma [flags]
for plan in g3_dropless.infer c3_dropless.infer g1_dropless.infer c1_dropless.infer d1_dropless.infer d2_dropless.infer; do
  for w in 0 1; do row "${plan%.infer}-w$w" "$plan" $w; done
done
for plan in g3_dropless.train c3_dropless.train c3_cap1.train; do
  for w in 0 1; do row "${plan%.train}-train-w$w" "$plan" $w --train; done
done
echo "done at ${SECONDS}s"
