#!/usr/bin/env bash
# The one-GPU kernels of issue 13 on the device, in ONE device call, after
# bench/gpu_gemm.sh (GEMM_BENCH=0) built and ran the CUDA tests in $BUILD:
#   1. compute-sanitizer memcheck over the gate paths (lanes, one block),
#      the few-token router and the chunked combine; racecheck and
#      synccheck over the gate's shared-memory hand-offs,
#   2. flex-gate-bench (every gate path per shape, the router both ways),
#   3. flex-gemm-bench on the decode and few-rows training shapes,
#   4. the decode layers D1/D2 through moe-run (device kernel, eager and as a
#      graph) and the PyTorch layer on them, on the same card.
# Needs bench/plans (bench/make_plans.sh) for step 4. Logs go to $OUT.
#
#   GEMM_BENCH=0 bench/gpu_gemm.sh && bench/gpu_kernels.sh   (~4 minutes)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="${BUILD:-$root/build-gpu}"
PLANS="${PLANS:-$root/bench/plans}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
exec > >(tee "$OUT/kernels-log.txt") 2>&1
status=0
kernels="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
timeout 300 ninja -C "$BUILD" flex-gate-bench flex-gemm-bench moe-run \
  > "$OUT/kernels-build.log" 2>&1 || { echo "build FAILED"; tail -20 "$OUT/kernels-build.log"; exit 1; }

sanitize() { # tool filter
  local tool=$1 filter=$2
  timeout 150 compute-sanitizer --tool "$tool" --report-api-errors no \
    --error-exitcode 3 "$kernels" --gtest_brief=1 --gtest_filter="$filter" \
    > "$OUT/kernels-$tool.log" 2>&1
  local rc=$?
  (( rc == 0 )) || status=1
  echo "$tool: exit $rc ($(grep -E 'ERROR SUMMARY' "$OUT/kernels-$tool.log" | tail -1))" \
       "$(grep -E '^\[  (PASSED|FAILED) ' "$OUT/kernels-$tool.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' "$OUT/kernels-$tool.log" | head -5
}
echo "=== sanitizers ($SECONDS s)"
sanitize memcheck 'Paths/CudaGatePaths.MatchTheCpuGate/E64_k2*:Paths/CudaGatePaths.MatchTheCpuGate/E256_k8*:Paths/CudaGatePaths.MatchTheCpuGate/E37*:Types/CudaRouterPaths.*:CudaCombine.*'
sanitize racecheck 'Paths/CudaGatePaths.MatchTheCpuGate/E64_k2_fixed_OneBlock:Paths/CudaGatePaths.MatchTheCpuGate/E64_k2_bp_dropless_OneBlock:Paths/CudaGatePaths.MatchTheCpuGate/E64_k2_fixed_Lanes'
sanitize synccheck 'Paths/CudaGatePaths.MatchTheCpuGate/E8_k1*:Paths/CudaGatePaths.MatchTheCpuGate/E37*'

echo "=== flex-gate-bench ($SECONDS s)"
timeout 120 "$BUILD/bin/flex-gate-bench" --iters 25 > "$OUT/kernels-gate-bench.log" 2>&1
rc=$?; (( rc == 0 )) || status=1
grep -vE '^ +(old|new|legacy|tile|lanes|one-block|auto) +total' "$OUT/kernels-gate-bench.log" | tail -45
echo "gate-bench: exit $rc"

echo "=== flex-gemm-bench ($SECONDS s)"
timeout 120 "$BUILD/bin/flex-gemm-bench" --iters 10 \
  --only "${SHAPES:-decode_t256,decode_t128_big,train_e64_r32,train_e16_r64,c3_t2048}" \
  > "$OUT/kernels-gemm-bench.log" 2>&1
rc=$?; (( rc == 0 )) || status=1
tail -22 "$OUT/kernels-gemm-bench.log"; echo "gemm-bench: exit $rc"

echo "=== decode layers ($SECONDS s)"
for layer in ${LAYERS:-d1_dropless.infer d2_dropless.infer}; do
  plan="$PLANS/$layer.json"
  [[ -f "$plan" ]] || { echo "$layer: no plan"; status=1; continue; }
  for mode in device device-graph; do
    graph=""; [[ $mode == *-graph ]] && graph="--graph"
    log="$OUT/kernels-layers.txt"
    echo "### $layer $mode" >> "$log"
    FLEX_GROUPED_GEMM=device timeout 120 "$BUILD/bin/moe-run" "$plan" --device cuda \
      $graph --iters 20 --warmup 3 >> "$log" 2>&1
    rc=$?; (( rc == 0 )) || status=1
    echo "$layer $mode (exit $rc): $(sed -n "/### $layer $mode/,\$p" "$log" | grep -E '^forward:' | tail -1)"
  done
done
sed -n '/device$/,/###/p' "$OUT/kernels-layers.txt" | grep -E "###|router|gate|dispatch|grouped|glu|combine" | head -30
if [[ "${TORCH:-1}" != 0 ]]; then
  timeout 150 python3 -u bench/torch_moe_layer.py --configs d1,d2 --modes dropless \
    --iters 20 --out "$OUT/kernels-torch.json" > "$OUT/kernels-torch.log" 2>&1
  rc=$?; (( rc == 0 )) || status=1
  tail -8 "$OUT/kernels-torch.log"; echo "torch: exit $rc"
fi
echo "done in $SECONDS s; overall $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
