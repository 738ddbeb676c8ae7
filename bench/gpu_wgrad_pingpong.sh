#!/usr/bin/env bash
# The ping-pong weight gradient's hang (session 14): each wgmma tile's
# weight gradient on 70 experts in its own process, every GPU kernel test,
# memcheck over the new test, and the C3 GEMM table (the weight gradient's
# time on each tile). Run from the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; B="${BUILD:-/tmp/bg}"
mkdir -p "$OUT"
exec > >(tee "$OUT/wgrad-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
(cmake -S . -B "$B" -G Ninja -DFLEX_ENABLE_COMPILER=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
   -DCMAKE_BUILD_TYPE=Release > /dev/null &&
 ninja -C "$B" FlexCudaKernelsTests flex-gemm-bench > "$OUT/build.log" 2>&1) ||
  { echo "build FAILED"; tail -20 "$OUT/build.log"; exit 1; }
K="$B/unittests/Cuda/FlexCudaKernelsTests"
for t in cooperative wide ping_pong wide_pair; do
  timeout 60 "$K" --gtest_filter="Tiles/CudaHopperWgradTiles.ManyExpertsMatchFp64/$t" > "$OUT/tile-$t.log" 2>&1
  echo "wgrad tile $t: exit $?"
done
timeout 330 "$K" > "$OUT/kernels.log" 2>&1
echo "FlexCudaKernelsTests: exit $? $(grep -E '^\[  (PASSED|FAILED)|tests ran' "$OUT/kernels.log" | tr '\n' ' ')"
grep -E '^\[  FAILED' "$OUT/kernels.log" | cut -c1-120 | head
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 "$K" \
  --gtest_filter='Tiles/CudaHopperWgradTiles.*' > "$OUT/memcheck.log" 2>&1
echo "memcheck wgrad tiles: exit $? ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1))"
timeout 100 "$B/bin/flex-gemm-bench" --iters 10 --only c3 > "$OUT/gemm-bench.log" 2>&1
echo "flex-gemm-bench c3: exit $?"; grep -E "^c3|tiles:" "$OUT/gemm-bench.log" | cut -c1-330
