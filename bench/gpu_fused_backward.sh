#!/usr/bin/env bash
# The backward-fused step (grouped_gemm_activation_backward, issue 13 item 2)
# on the device, in ONE device call:
#   1. build only what the check needs (runtime with CUDA, no compiler),
#   2. its GPU tests: the kernel test on every shape and path, the executor
#      tests (every plan and variant against the reference, graph replay,
#      each +act_backward variant's bytes its original's), the moe-run
#      checks of the compiled decode plan,
#   3. compute-sanitizer memcheck over the kernel test and the executor's
#      bit-for-bit test,
#   4. with bench/plans carried (bench/make_plans.sh with
#      FLEX_PLAN_OPTIONS="fuse-activation-backward=true"): the training
#      layers' backward with the pair and with the fused step, wgmma on,
#      same card, same call, and the automatic choice among the variants.
# Logs go to $OUT (default bench/out).
#
#   bench/gpu_fused_backward.sh   (device machine; about 4 minutes)
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="${BUILD:-$root/build-gpu}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FLEX_WGMMA="${FLEX_WGMMA:-1}"
mkdir -p "$OUT"
exec > >(tee "$OUT/fused-backward-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
status=0

echo "=== build ($SECONDS s)"
if ! (cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
      timeout 330 ninja -C "$BUILD" FlexCudaKernelsTests FlexCudaExecutorTests \
        moe-run) > "$OUT/fused-backward-build.log" 2>&1; then
  echo "build FAILED"; grep -E "error|Error" "$OUT/fused-backward-build.log" | head -20
  tail -20 "$OUT/fused-backward-build.log"; exit 1
fi
kernels="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
executor="$BUILD/unittests/Cuda/FlexCudaExecutorTests"

echo "=== tests ($SECONDS s)"
run_tests() { # name binary filter limit
  timeout "$4" stdbuf -oL "$2" --gtest_filter="$3" > "$OUT/fused-backward-$1.log" 2>&1
  local rc=$?
  (( rc == 0 )) || status=1
  echo "$1: exit $rc; $(grep -cE '^\[       OK' "$OUT/fused-backward-$1.log") ok;" \
       "$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/fused-backward-$1.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]|Failure|error:' "$OUT/fused-backward-$1.log" | head -20
  (( rc == 124 )) && echo "  cut while in: $(grep -E '^\[ RUN' "$OUT/fused-backward-$1.log" | tail -1)"
}
run_tests kernels "$kernels" \
  'Shapes/CudaDeviceGemm.ActivationBackward*:CudaHopperGemm.ActivationBackward*' 150 &
run_tests executor "$executor" 'CudaExecutor.*:CudaStepKernels.*' 150 &
wait
(cd "$BUILD" && timeout 90 ctest -R 'moe-run.cuda.act-backward' --output-on-failure) \
  > "$OUT/fused-backward-ctest.log" 2>&1 || status=1
grep -E "tests passed|Failed|\*\*\*" "$OUT/fused-backward-ctest.log" | head -10

echo "=== memcheck ($SECONDS s)"
timeout 120 stdbuf -oL compute-sanitizer --tool memcheck --report-api-errors no \
  --error-exitcode 3 "$kernels" \
  --gtest_filter='Shapes/CudaDeviceGemm.ActivationBackward*:CudaHopperGemm.ActivationBackward*' \
  > "$OUT/fused-backward-memcheck.log" 2>&1
rc=$?
(( rc == 0 )) || status=1
echo "memcheck kernels: exit $rc ($(grep -E 'ERROR SUMMARY' "$OUT/fused-backward-memcheck.log" | tail -1))" \
     "$(grep -cE '^\[       OK' "$OUT/fused-backward-memcheck.log") tests done"
timeout 90 compute-sanitizer --tool memcheck --report-api-errors no \
  --error-exitcode 3 "$executor" --gtest_brief=1 \
  --gtest_filter='CudaExecutor.ActivationBackwardFusedVariantsEqualTheirOriginals' \
  > "$OUT/fused-backward-memcheck-executor.log" 2>&1
rc=$?
(( rc == 0 )) || status=1
echo "memcheck executor: exit $rc ($(grep -E 'ERROR SUMMARY' "$OUT/fused-backward-memcheck-executor.log" | tail -1))"

echo "=== layers: the backward with the pair and with the fused step ($SECONDS s)"
# variant: the plan's unfused one, its +act_backward copy, and auto.
for plan in c3_dropless.train c1_cap1.train c3_cap1.train c1_dropless.train; do
  [[ -f bench/plans/$plan.json ]] || continue
  base=single
  grep -q '"single+gather+act_backward"' "bench/plans/$plan.json" && base=single+gather
  for variant in "$base" "$base+act_backward" auto; do
    log="$OUT/layer-$plan-${variant//+/_}"
    timeout 90 "$BUILD/bin/moe-run" "bench/plans/$plan.json" --device cuda \
      --train --iters 10 --variant "$variant" --json > "$log.json" 2> "$log.err" ||
      { echo "$plan $variant: failed"; tail -3 "$log.err"; status=1; continue; }
    python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
b = d['backward']
steps = [(x['op'], round(x['mean_us'], 1)) for x in b['steps']
         if 'gemm' in x['op'] and 'wgrad' not in x['op'] or x['op'] == 'activation_backward']
print(f'{sys.argv[2]:18s} {d[\"variant\"]:28s} forward {d[\"forward\"][\"median_us\"]:8.1f} backward {b[\"median_us\"]:8.1f} us; {steps}')
" "$log.json" "$plan" || status=1
  done
done
echo "done in $SECONDS s; overall $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
