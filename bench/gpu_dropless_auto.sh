#!/usr/bin/env bash
# Dropless defaults on one GPU (issue 13, session 14): the aligned blocks'
# batched GEMM at C3's shapes bare and with a ReLU beside the padded batch
# (flex-gemm-bench c3_random); C3 dropless per layout and what `auto` picks
# over the layouts plan (--explain); the GEMM tests refactored after the
# last call. Plans from bench/make_baseline.sh; run inside bench/baseline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; BUILD="${BUILD:-build-gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/dropless-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
  ninja -C "$BUILD" moe-run flex-gemm-bench FlexCudaKernelsTests >> "$OUT/build.log" 2>&1 ||
  { echo "build FAILED"; tail -20 "$OUT/build.log"; exit 1; }
timeout 120 "$BUILD/bin/flex-gemm-bench" --iters 10 --only "${BENCH_ONLY:-c3_random}" \
  > "$OUT/gemm-bench.log" 2>&1
echo "flex-gemm-bench: exit $?"; grep -E "^(shape|c3|  )|aligned|padded" "$OUT/gemm-bench.log" | head -30
. bench/moe_run_row.sh
MOE_RUN="$BUILD/bin/moe-run" ROW_LOGS="$OUT"
row() { moe_run_row "$@"; } # label plan variant [-- moe-run flags]
for i in 1 2; do
  row cap1 c3_cap1.infer single
  row ragged c3_dropless_layouts.infer ragged
  row padded c3_dropless_layouts.infer padded
  row aligned c3_dropless_layouts.infer aligned
  row auto c3_dropless_layouts.infer auto
done
row cap1-train c3_cap1.train single -- --train
row auto-train c3_dropless_layouts.train auto -- --train
timeout 60 "$BUILD/bin/moe-run" bench/plans/c3_dropless_layouts.infer.json --device cuda \
  --iters 5 --explain > "$OUT/explain.txt" 2>&1; echo "explain: exit $?"; cat "$OUT/explain.txt" | head -40
K="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
timeout 150 "$K" --gtest_filter='CudaDeviceGemmGraph.*:CudaAlignedGemm.*:*WeightGradientMatchesFp64*:*PerExpertGemmsOnSideStreams*' \
  > "$OUT/tests.log" 2>&1
echo "refactored GEMM tests: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/tests.log" | tr '\n' ' ')"
grep -E '^\[  FAILED' "$OUT/tests.log" | head
