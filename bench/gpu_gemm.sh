#!/usr/bin/env bash
# The device-sized grouped GEMM on the device, in ONE device call (issue 13,
# items 1 and 5):
#   1. build only what the check needs (runtime with CUDA, no compiler),
#   2. the two CUDA test binaries at once, three gtest shards each, with the
#      wgmma kernel's own tests (CudaHopperGemm.*) in a process of their own
#      (all must pass), then the moe-run device checks (ctest -R
#      moe-run.cuda),
#   3. compute-sanitizer memcheck over the grouped GEMM tests and the
#      dropless graph test,
#   4. flex-gemm-bench (run before the tests): the device kernel, cuBLAS per
#      expert and cuBLAS strided-batched on the same card in one process,
#      against the floor (every mma.sync and, on Hopper, every wgmma tile of
#      the forward, the GLU step and the weight gradient, and the fused
#      bias + ReLU);
#   5. with bench/plans carried: moe-run on C3's, G3's and D1's dropless
#      plans with the wgmma kernel off, on under the rule, and on for every
#      GEMM with each tile (FLEX_WGMMA, FLEX_GROUPED_GEMM=device,
#      FLEX_WGMMA_TILE), same card, same call.
# FLEX_WGMMA (default 1 here) is exported for the tests and the checks, so
# the executor tests and moe-run.cuda run the wgmma kernel on Hopper (the
# runtime's default is 0 until this script has passed there; the kernel
# tests always run it). Logs go to $OUT (default bench/out).
#
#   bench/gpu_gemm.sh         (device machine; about 6 minutes)
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="${BUILD:-$root/build-gpu}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FLEX_WGMMA="${FLEX_WGMMA:-1}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gemm-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
status=0

echo "=== build ($SECONDS s)"
if ! (cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
      timeout 330 ninja -C "$BUILD" FlexCudaKernelsTests FlexCudaExecutorTests \
        flex-gemm-bench moe-run) > "$OUT/gemm-build.log" 2>&1; then
  echo "build FAILED"; grep -E "error|Error" "$OUT/gemm-build.log" | head -20
  tail -20 "$OUT/gemm-build.log"; exit 1
fi
kernels="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
executor="$BUILD/unittests/Cuda/FlexCudaExecutorTests"

if [[ "${GEMM_BENCH:-1}" != 0 ]]; then  # GEMM_BENCH=0: the tests only
  echo "=== bench ($SECONDS s)"
  timeout 120 "$BUILD/bin/flex-gemm-bench" --iters 15 > "$OUT/gemm-bench.log" 2>&1
  rc=$?
  (( rc == 0 )) || status=1
  cat "$OUT/gemm-bench.log"
  echo "bench: exit $rc (1 = the paths' outputs differ or the kernel refused)"
fi

# Both test binaries run at once, each as $SHARDS gtest shards, on the one
# card: the suites are mostly small, launch-bound cases, so this fits the
# call's limit.
SHARDS="${SHARDS:-3}"
echo "=== test binaries, $SHARDS shards each, and CudaHopperGemm.* alone ($SECONDS s)"
# The wgmma kernel's own tests run in a process of their own: a kernel that
# traps (its barrier-wait limit) leaves a sticky error that would fail the
# rest of a shard's tests.
timeout 300 stdbuf -oL "$kernels" --gtest_filter='CudaHopperGemm.*' \
  > "$OUT/gemm-hopper.log" 2>&1 &
hopper_pid=$!
declare -A shard_pid
for bin in "$kernels" "$executor"; do
  name=$(basename "$bin")
  for ((i = 0; i < SHARDS; i++)); do
    # Line-buffered and not brief: a shard cut by its limit shows the test
    # it was in (its last "[ RUN ]").
    GTEST_TOTAL_SHARDS=$SHARDS GTEST_SHARD_INDEX=$i timeout 300 stdbuf -oL "$bin" \
      --gtest_filter='-CudaHopperGemm.*' > "$OUT/gemm-$name.$i.log" 2>&1 &
    shard_pid[$name.$i]=$!
  done
done
wait "$hopper_pid"
rc=$?
(( rc == 0 )) || status=1
echo "CudaHopperGemm.*: exit $rc; $(grep -E '^\[  (PASSED|FAILED|SKIPPED) |^\[       OK|^\[  FAILED  \] CudaHopper' "$OUT/gemm-hopper.log" | tr '\n' ' ')"
grep -E 'Failure|error:' "$OUT/gemm-hopper.log" | head -20
(( rc == 124 )) && echo "  cut while in: $(grep -E '^\[ RUN' "$OUT/gemm-hopper.log" | tail -1)"
for bin in "$kernels" "$executor"; do
  name=$(basename "$bin")
  for ((i = 0; i < SHARDS; i++)); do
    wait "${shard_pid[$name.$i]}"
    rc=$?
    (( rc == 0 )) || status=1
    echo "$name shard $i: exit $rc; $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/gemm-$name.$i.log" | tr '\n' ' ')"
    grep -E '^\[  FAILED  \]|Failure|error:' "$OUT/gemm-$name.$i.log" | head -20
    (( rc == 124 )) && echo "  cut while in: $(grep -E '^\[ RUN' "$OUT/gemm-$name.$i.log" | tail -1)"
  done
done
echo "tests done ($SECONDS s)"
echo "=== moe-run checks ($SECONDS s)"
(cd "$BUILD" && timeout 90 ctest -R 'moe-run.cuda' --output-on-failure) > "$OUT/gemm-ctest.log" 2>&1
rc=$?
(( rc == 0 )) || status=1
grep -E "tests passed|Failed|\*\*\*" "$OUT/gemm-ctest.log" | head -10

echo "=== memcheck ($SECONDS s)"
# API errors off: some tests make CUDA calls fail on purpose. Memory errors
# still count (exit 3).
timeout 150 stdbuf -oL compute-sanitizer --tool memcheck --report-api-errors no \
  --error-exitcode 3 "$kernels" \
  --gtest_filter='CudaHopperGemm.*:CudaDeviceGemmGraph.*:Shapes/CudaDeviceGemm.*' \
  > "$OUT/gemm-memcheck.log" 2>&1
rc=$?
(( rc == 0 )) || status=1
echo "memcheck kernels: exit $rc ($(grep -E 'ERROR SUMMARY' "$OUT/gemm-memcheck.log" | tail -1))" \
     "$(grep -E '^\[  (PASSED|FAILED) ' "$OUT/gemm-memcheck.log" | tr '\n' ' ')" \
     "$(grep -cE '^\[       OK' "$OUT/gemm-memcheck.log") tests done" \
     "$( (( rc == 124 )) && grep -E '^\[ RUN' "$OUT/gemm-memcheck.log" | tail -1)"
timeout 100 compute-sanitizer --tool memcheck --report-api-errors no \
  --error-exitcode 3 "$executor" --gtest_brief=1 \
  --gtest_filter='CudaExecutor.DroplessGraphRoutesEachCallOnTheDevice' \
  > "$OUT/gemm-memcheck-executor.log" 2>&1
rc=$?
(( rc == 0 )) || status=1
echo "memcheck executor: exit $rc ($(grep -E 'ERROR SUMMARY' "$OUT/gemm-memcheck-executor.log" | tail -1))"
if ls bench/plans/c3_dropless.infer.json > /dev/null 2>&1; then
  echo "=== layers: wgmma off, on (auto), and on every GEMM with each tile ($SECONDS s)"
  # Settings: name, then FLEX_WGMMA FLEX_GROUPED_GEMM FLEX_WGMMA_TILE.
  settings=("off 0 auto auto" "auto 1 auto auto" "wide 1 device wide"
            "pair 1 device pair" "ping-pong 1 device ping-pong")
  for plan in c3_dropless.infer g3_dropless.infer d1_dropless.infer; do
    [[ -f bench/plans/$plan.json ]] || continue
    for setting in "${settings[@]}"; do
      read -r name wgmma impl tile <<< "$setting"
      log="$OUT/layer-$plan-$name"
      FLEX_WGMMA=$wgmma FLEX_GROUPED_GEMM=$impl FLEX_WGMMA_TILE=$tile \
        timeout 60 "$BUILD/bin/moe-run" "bench/plans/$plan.json" \
        --device cuda --iters 10 --json > "$log.json" 2> "$log.err" ||
        { echo "$plan $name: failed"; tail -3 "$log.err"; status=1; continue; }
      python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
f = d['forward']
gemms = [round(x['mean_us'], 1) for x in f['steps'] if 'gemm' in x['op']]
print(f'{sys.argv[2]:20s} {sys.argv[3]:9s} {d[\"variant\"]:22s} forward median {f[\"median_us\"]:8.1f} us, expert GEMMs {gemms}')
" "$log.json" "$plan" "$name"
    done
  done
fi
echo "done in $SECONDS s; overall $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
