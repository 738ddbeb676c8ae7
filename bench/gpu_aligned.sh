#!/usr/bin/env bash
# The aligned layout's follow-up call (issue 13; Runs 37-38): C3 dropless on
# the aligned layout, eagerly, as a graph and training, beside capacity 1.0
# and the padded layout; the gate's aligned offsets on every gate path;
# memcheck over the aligned GEMM's tests. Plans from bench/make_baseline.sh;
# run inside bench/baseline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; BUILD="${BUILD:-build-gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/aligned-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
  ninja -C "$BUILD" moe-run FlexCudaKernelsTests >> "$OUT/build.log" 2>&1 ||
  { echo "build FAILED"; tail -20 "$OUT/build.log"; exit 1; }
. bench/moe_run_row.sh
MOE_RUN="$BUILD/bin/moe-run" ROW_LOGS="$OUT"
row() { moe_run_row "$@"; } # label plan variant [env...] [-- moe-run flags]
for i in 1 2; do
  row cap1 c3_cap1.infer single
  row padded c3_dropless_layouts.infer padded
  row aligned c3_dropless_layouts.infer aligned
  row aligned-graph c3_dropless_layouts.infer aligned -- --graph
done
row cap1-train c3_cap1.train single -- --train
row padded-train c3_dropless_layouts.train padded -- --train
row aligned-train c3_dropless_layouts.train aligned -- --train
K="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
timeout 120 "$K" --gtest_filter='*CudaGateShapes*noise_bp*:*CudaGatePaths*noise_bp*' > "$OUT/gate.log" 2>&1
echo "gate paths (aligned offsets): exit $? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/gate.log" | tr '\n' ' ')"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$K" \
  --gtest_filter='CudaAlignedGemm.*:*CudaKernels*bf16_aligned*' > "$OUT/memcheck.log" 2>&1
echo "memcheck aligned: exit $? ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1))"
