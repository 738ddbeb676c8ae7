#!/usr/bin/env bash
# The shortest device call that checks a kernel change (about 4 minutes
# with a fresh machine's build): the wgmma forward's tests and the fused
# stores' (the device GEMM on every tile, the epilogues, the activation
# and GLU backwards), then C3 fc1 / fc2 on the tiles (with the bias + ReLU
# and ReLU-backward stores fused against GEMM + pass) and the decode GEMMs
# with A's 32-row boxes against FLEX_WGMMA_A=full (4707569: reverted in
# 42284b7 until a GPU runs it; `git revert 42284b7` first, else both rows
# time the same code). For a session with
# little device time left; bench/gpu_preload.sh is the whole round. Run
# inside bench/baseline:
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> bash bench/gpu_short_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
device_call short -DFLEX_ENABLE_TESTS=ON -- flex-gemm-bench FlexCudaKernelsTests
K="$B/unittests/Cuda/FlexCudaKernelsTests"
timeout 60 "$K" --gtest_filter='CudaDeviceGemmTiles.EveryTileMatchesFp64:*EpilogueMatchesFp64OnBothPaths/*:*ActivationBackwardMatches*:*CudaDeviceGemm.Forward*:*GluMatches*:*GluBackwardMatches*' \
  > "$LOGS/kernels.log" 2>&1
echo "tests: exit $?, $(grep -c '^\[       OK' "$LOGS/kernels.log") ok, $(grep -c '^\[  FAILED  \] [A-Z]' "$LOGS/kernels.log") failed; $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/kernels.log" | tr '\n' ' ') last: $(grep -E '^\[ RUN' "$LOGS/kernels.log" | tail -1 | cut -c1-90)"
grep -E '^\[  FAILED' "$LOGS/kernels.log" | cut -c1-140 | head
G="$B/bin/flex-gemm-bench"
for a in boxes full; do
  FLEX_WGMMA_A=$a timeout 25 "$G" --iters 20 --only decode_t256,decode_t128_big > "$LOGS/gemm-decode-$a.log" 2>&1
  echo "== decode, A $a (exit $?)"
  grep -E "^decode|wgmma 128x256|gathered" "$LOGS/gemm-decode-$a.log" | sed -E 's/small.*wide 128x256 [0-9.]+ us \([0-9]+ TF\/s\)//' | cut -c1-240
done
timeout 60 "$G" --iters 5 --only c3 > "$LOGS/gemm-c3.log" 2>&1
echo "== c3 (exit $?)"
grep -E "^c3|wgmma 128x256|bias|backward" "$LOGS/gemm-c3.log" | sed -E 's/small.*wide 128x256 [0-9.]+ us \([0-9]+ TF\/s\)//' | cut -c1-240
echo "done at ${SECONDS}s"
