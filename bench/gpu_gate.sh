#!/usr/bin/env bash
# The CUDA gate on the device, in ONE device call (issue 13, item 3):
#   1. build only what the check needs (runtime with CUDA, no compiler),
#   2. the two CUDA test binaries, each in one process (all must pass),
#   3. compute-sanitizer memcheck over the gate's kernel tests (a subset of
#      CudaGateShapes covering both paths, so it stays inside the call),
#   4. flex-gate-bench: the legacy and the fused gate timed on the same card
#      in one process, per launch, against the copy-bandwidth floor.
# The table is printed last; logs go to $OUT (default bench/out).
#
#   bench/gpu_gate.sh         (device machine; about 5 minutes, at most ~480 s)
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="$root/build-gpu"
mkdir -p "$OUT"
exec > >(tee "$OUT/gate-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
status=0

echo "=== build ($SECONDS s)"
if ! (cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
      timeout 300 ninja -C "$BUILD" FlexCudaKernelsTests FlexCudaExecutorTests \
        flex-gate-bench) > "$OUT/gate-build.log" 2>&1; then
  echo "build FAILED"; grep -E "error|Error" "$OUT/gate-build.log" | head -20
  tail -20 "$OUT/gate-build.log"; exit 1
fi
kernels="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
executor="$BUILD/unittests/Cuda/FlexCudaExecutorTests"

for bin in "$kernels" "$executor"; do
  name=$(basename "$bin")
  echo "=== $name ($SECONDS s)"
  timeout 150 "$bin" --gtest_brief=1 > "$OUT/gate-$name.log" 2>&1
  rc=$?
  (( rc == 0 )) || status=1
  echo "$name: exit $rc; $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/gate-$name.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]|Failure|error:' "$OUT/gate-$name.log" | head -20
done

echo "=== memcheck ($SECONDS s)"
# API errors off: some tests make CUDA calls fail on purpose. Memory errors
# still count (exit 3).
filter='CudaGate.*:Shapes/CudaGateShapes.MatchTheCpuGate/E256_*'
filter+=':Shapes/CudaGateShapes.MatchTheCpuGate/E8_k1*'
filter+=':Shapes/CudaGateShapes.MatchTheCpuGate/E37*'
filter+=':Shapes/CudaGateShapes.MatchTheCpuGate/E300*'
filter+=':Shapes/CudaGateShapes.MatchTheCpuGate/E64_k6*'
timeout 150 compute-sanitizer --tool memcheck --report-api-errors no \
  --error-exitcode 3 "$kernels" --gtest_brief=1 --gtest_filter="$filter" \
  > "$OUT/gate-memcheck.log" 2>&1
rc=$?
(( rc == 0 )) || status=1
echo "memcheck: exit $rc ($(grep -E 'ERROR SUMMARY' "$OUT/gate-memcheck.log" | tail -1))" \
     "$(grep -E '^\[  (PASSED|FAILED) ' "$OUT/gate-memcheck.log" | tr '\n' ' ')"

echo "=== bench ($SECONDS s)"
timeout 90 "$BUILD/bin/flex-gate-bench" --iters 25 > "$OUT/gate-bench.log" 2>&1
rc=$?
(( rc == 0 )) || status=1
cat "$OUT/gate-bench.log"
echo "bench: exit $rc (1 = the two paths' outputs differ)"
echo "done in $SECONDS s; overall $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
