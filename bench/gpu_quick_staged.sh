#!/usr/bin/env bash
# A short device call (issue 13, session 16's third): the staged store
# without 3f2354c's serialized wgmmas, against the direct store and other
# raster bands on C3 (flex-gemm-bench), then the GEMM tests for as long as
# the call lasts. Every log goes straight to $OUT (a call cut short keeps
# them). Run inside bench/baseline (bench/make_baseline.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; B="${BUILD:-/tmp/bq}"
mkdir -p "$OUT"
exec > >(tee "$OUT/quick-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
(cmake -S . -B "$B" -G Ninja -DFLEX_ENABLE_COMPILER=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
   -DCMAKE_BUILD_TYPE=Release > /dev/null &&
 ninja -C "$B" flex-gemm-bench FlexCudaKernelsTests > "$OUT/build.log" 2>&1) ||
  { echo "build FAILED"; tail -20 "$OUT/build.log"; exit 1; }
echo "built at ${SECONDS}s"
G="$B/bin/flex-gemm-bench"
bench() { # label only [env...]
  local label=$1 only=$2; shift 2
  env "$@" timeout 100 "$G" --iters 10 --only "$only" > "$OUT/gemm-$label.log" 2>&1
  echo "== $label (exit $?)"
  grep -E "^c3|wgmma|bias" "$OUT/gemm-$label.log" | sed -E 's/small.*wide 128x256 [0-9.]+ us \([0-9]+ TF\/s\)//' | cut -c1-300
}
bench staged c3
bench direct c3 FLEX_WGMMA_STORE=direct
bench raster4 c3 FLEX_WGMMA_RASTER=4
bench raster16 c3 FLEX_WGMMA_RASTER=16
bench staged-random c3_random
echo "bench done at ${SECONDS}s"
timeout 400 "$B/unittests/Cuda/FlexCudaKernelsTests" \
  --gtest_filter='*CudaDeviceGemm*:*CudaGemmCombine*:*CudaAlignedGemm*:*CudaHopper*:*CudaGroupedGemm*:*CudaStaticGemm*' \
  > "$OUT/kernels.log" 2>&1
echo "GEMM tests: exit $? $(grep -cE '^\[       OK' "$OUT/kernels.log") ok, $(grep -cE '^\[  FAILED' "$OUT/kernels.log") failed; $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/kernels.log" | tr '\n' ' ')"
echo "done at ${SECONDS}s"
