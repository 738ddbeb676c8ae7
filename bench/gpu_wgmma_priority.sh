#!/usr/bin/env bash
# What one short device call can settle about the wgmma kernel's defaults
# and the backward-fused step, when the session has one call left (issue
# 13): each phase has its own limit and is skipped once the call's budget
# (BUDGET seconds, default 570) would run out.
#   1. build the runtime with CUDA (no compiler),
#   2. at once: the wgmma kernel's own tests (CudaHopperGemm.*, every tile
#      and form, clusters included), the backward-fused step's kernel test,
#      the executor tests (every plan and variant, graph replay, the
#      backward-fused variants' bytes against their originals),
#   3. flex-gemm-bench: every wgmma tile against cuBLAS on the same card,
#   4. the layers: C3 / G3 / D1 dropless forward with wgmma off, on under the
#      rule, and on every GEMM with each tile; the training layers' backward
#      with the pair and the fused step (bench/plans from make_plans.sh with
#      FLEX_PLAN_OPTIONS="fuse-activation-backward=true"),
#   5. compute-sanitizer memcheck over the wgmma tests and the fused steps'
#      (the backwards' and grouped_gemm_combine's).
# The combine in fc2's store (CudaGemmCombine.*, the executor's +combine
# variants, moe-run.cuda.combine-*) runs beside the fused backwards; the
# layers compare single+gather with single+gather+combine (plans with
# FLEX_PLAN_OPTIONS="fuse-activation-backward=true fuse-combine=true").
# The full suite and its shards are bench/gpu_gemm.sh's.
# A short call: BENCH_ONLY=c3,decode_t512 times those shapes alone,
# QUICK=1 runs only the layers' fused-against-pair rows and skips memcheck;
# TESTS_LIMIT caps the tests' seconds (default 150), CHECKS=0 skips the
# moe-run checks.
#
#   bench/gpu_wgmma_priority.sh   (device machine; at most BUDGET seconds)
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="${BUILD:-$root/build-gpu}"
BUDGET="${BUDGET:-570}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FLEX_WGMMA="${FLEX_WGMMA:-1}"
mkdir -p "$OUT"
exec > >(tee "$OUT/priority-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
status=0
# The seconds a phase may take: its own limit, or what the budget has left.
limit() {
  local left=$((BUDGET - SECONDS))
  echo $(( left < $1 ? left : $1 ))
}

echo "=== build ($SECONDS s)"
if ! (cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
      timeout 240 ninja -C "$BUILD" FlexCudaKernelsTests FlexCudaExecutorTests \
        flex-gemm-bench moe-run) > "$OUT/priority-build.log" 2>&1; then
  echo "build FAILED"; grep -E "error|Error" "$OUT/priority-build.log" | head -20
  tail -20 "$OUT/priority-build.log"; exit 1
fi
kernels="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
executor="$BUILD/unittests/Cuda/FlexCudaExecutorTests"

layer() { # label plan variant FLEX_WGMMA FLEX_GROUPED_GEMM FLEX_WGMMA_TILE [--train]
  local log="$OUT/layer-$2-$1"
  (( BUDGET - SECONDS > 20 )) || { echo "$2 $1: skipped (budget)"; return; }
  FLEX_WGMMA=$4 FLEX_GROUPED_GEMM=$5 FLEX_WGMMA_TILE=$6 \
    timeout "$(limit 40)" "$BUILD/bin/moe-run" "bench/plans/$2.json" \
    --device cuda --iters 10 --variant "$3" --json ${7:-} > "$log.json" 2> "$log.err" ||
    { echo "$2 $1: failed"; tail -3 "$log.err"; status=1; return; }
  python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
f, b = d['forward'], d.get('backward')
gemms = [round(x['mean_us'], 1) for x in f['steps'] if 'gemm' in x['op'] or x['op'] == 'combine']
line = f'{sys.argv[2]:18s} {sys.argv[3]:10s} {d[\"variant\"]:28s} forward {f[\"median_us\"]:8.1f} us, GEMMs {gemms}'
if b:
    steps = [(x['op'], round(x['mean_us'], 1)) for x in b['steps']
             if x['op'] in ('grouped_gemm', 'activation_backward',
                            'grouped_gemm_activation_backward', 'glu_backward',
                            'grouped_gemm_glu_backward')]
    line += f'; backward {b[\"median_us\"]:8.1f} us {steps}'
print(line)
" "$log.json" "$2" "$1" || status=1
}
# Dropless on the padded layout (C = the largest expert's rows: one
# strided-batched GEMM over E x C rows) against the ragged layout (a GEMM
# per expert after the host read) and capacity 1.0, on the default paths
# (plans from bench/make_baseline.sh: c3_dropless_layouts.*, compiled with
# layouts=padded,ragged,aligned); the ragged layout's per-expert GEMMs also
# on 2 and 4 streams; the aligned layout (one batched GEMM over 128-row
# blocks, no host read) eagerly and, its forward, as a CUDA graph.
if [[ -f bench/plans/c3_dropless_layouts.infer.json ]]; then
  echo "=== dropless layouts ($SECONDS s)"
  for mode in infer train; do
    train=; [[ $mode == train ]] && train=--train
    layer cap1 "c3_cap1.$mode" single 0 auto auto $train
    layer ragged "c3_dropless_layouts.$mode" ragged 0 auto auto $train
    # Its per-expert GEMMs on 2 and 4 streams (gemm_streams).
    for streams in 2 4; do
      FLEX_GEMM_STREAMS=$streams layer "ragged-s$streams" \
        "c3_dropless_layouts.$mode" ragged 0 auto auto $train
    done
    layer padded "c3_dropless_layouts.$mode" padded 0 auto auto $train
    layer aligned "c3_dropless_layouts.$mode" aligned 0 auto auto $train
  done
  layer aligned-graph c3_dropless_layouts.infer aligned 0 auto auto --graph
fi

echo "=== tests ($SECONDS s)"
run_tests() { # name binary filter seconds
  timeout "$4" stdbuf -oL "$2" --gtest_filter="$3" > "$OUT/priority-$1.log" 2>&1
  local rc=$?
  echo "$1: exit $rc; $(grep -cE '^\[       OK' "$OUT/priority-$1.log") ok;" \
       "$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/priority-$1.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]|Failure|error:' "$OUT/priority-$1.log" | head -12
  (( rc == 124 )) && echo "  cut while in: $(grep -E '^\[ RUN' "$OUT/priority-$1.log" | tail -1)"
  return $rc
}
t=$(limit "${TESTS_LIMIT:-150}")
run_tests hopper "$kernels" 'CudaHopperGemm.*' "$t" & p1=$!
run_tests act-backward "$kernels" \
  'Shapes/CudaDeviceGemm.ActivationBackward*:Shapes/CudaDeviceGemm.GluBackward*:CudaGemmCombine.*:CudaSideStreams.*:Shapes/CudaDeviceGemm.PerExpertGemmsOnSideStreams*:CudaAlignedGemm.*:*CudaKernels*aligned*:CudaGate*' "$t" & p2=$!
run_tests executor "$executor" 'CudaExecutor.*:CudaStepKernels.*' "$t" & p3=$!
for p in $p1 $p2 $p3; do wait "$p" || status=1; done

if (( BUDGET - SECONDS > 60 )) && [[ ${CHECKS:-1} != 0 ]]; then
  echo "=== moe-run checks ($SECONDS s)"
  (cd "$BUILD" && timeout "$(limit 60)" ctest \
     -R 'moe-run.cuda.(combine|act-backward|glu-backward|aligned)' 2>&1 |
     grep -E "Passed|Failed|Skipped|tests passed|Not Run|Timeout") || status=1
fi
if (( BUDGET - SECONDS > 30 )); then
  echo "=== bench ($SECONDS s)"
  timeout "$(limit 100)" "$BUILD/bin/flex-gemm-bench" --iters 10 \
    ${BENCH_ONLY:+--only "$BENCH_ONLY"} > "$OUT/priority-bench.log" 2>&1
  rc=$?
  (( rc == 0 )) || status=1
  cat "$OUT/priority-bench.log"
  echo "bench: exit $rc (1 = the paths' outputs differ or the kernel refused)"
fi

if [[ -f bench/plans/c3_dropless.infer.json ]]; then
  echo "=== layers ($SECONDS s)"
  for plan in c3_dropless.infer g3_dropless.infer d1_dropless.infer; do
    [[ -f bench/plans/$plan.json && -z ${QUICK:-} ]] || continue
    layer off "$plan" auto 0 auto auto
    layer auto "$plan" auto 1 auto auto
    layer wide "$plan" auto 1 device wide
    layer pair "$plan" auto 1 device pair
    layer ping-pong "$plan" auto 1 device ping-pong
  done
  # The combine in fc2's store (grouped_gemm_combine) against the pair, on
  # the gathered variants (plans from FLEX_PLAN_OPTIONS with
  # fuse-combine=true).
  # A gathered GEMM at prefill sizes: the rows copied and cuBLAS (8b4df81),
  # against the plain variant, wgmma off and on.
  for w in 0 1; do
    layer "plain-wgmma$w" c3_dropless.infer single "$w" auto auto
    layer "gather-wgmma$w" c3_dropless.infer single+gather "$w" auto auto
  done
  for plan in d1_dropless.infer d2_dropless.infer c1_cap1.infer c3_dropless.infer; do
    [[ -f bench/plans/$plan.json ]] || continue
    [[ -n ${QUICK:-} && $plan != d1_* && $plan != c3_* ]] && continue
    grep -q '"single+gather+combine"' "bench/plans/$plan.json" || continue
    layer pair "$plan" single+gather 1 auto auto
    layer combine "$plan" single+gather+combine 1 auto auto
    layer combine-wgmma "$plan" single+gather+combine 1 device auto
  done
  # A gated plan's pair is fc2's input gradient and glu_backward, compared
  # on its glu-fused variant.
  for plan in c3_dropless.train c1_cap1.train g3_dropless.train; do
    [[ -f bench/plans/$plan.json ]] || continue
    base=single
    grep -q '"single+glu+act_backward"' "bench/plans/$plan.json" && base=single+glu
    layer pair-unfused "$plan" "$base" 1 auto auto --train
    layer fused "$plan" "$base+act_backward" 1 auto auto --train
    [[ -z ${QUICK:-} ]] && layer auto "$plan" auto 1 auto auto --train
  done
fi

if (( BUDGET - SECONDS > 40 )) && [[ -z ${QUICK:-} ]]; then
  echo "=== memcheck ($SECONDS s)"
  timeout "$(limit 120)" stdbuf -oL compute-sanitizer --tool memcheck \
    --report-api-errors no --error-exitcode 3 "$kernels" \
    --gtest_filter='CudaAlignedGemm.*:CudaGemmCombine.*:CudaHopperGemm.*:Shapes/CudaDeviceGemm.ActivationBackward*/decode*:Shapes/CudaDeviceGemm.GluBackward*/decode*:CudaSideStreams.*:Shapes/CudaDeviceGemm.PerExpertGemmsOnSideStreams*/prefill_ragged' \
    > "$OUT/priority-memcheck.log" 2>&1
  rc=$?
  (( rc == 0 || rc == 124 )) || status=1
  echo "memcheck: exit $rc ($(grep -E 'ERROR SUMMARY' "$OUT/priority-memcheck.log" | tail -1))" \
       "$(grep -cE '^\[       OK' "$OUT/priority-memcheck.log") tests done" \
       "$( (( rc == 124 )) && grep -E '^\[ RUN' "$OUT/priority-memcheck.log" | tail -1)"
fi
echo "done in $SECONDS s; overall $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
