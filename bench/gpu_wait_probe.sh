#!/usr/bin/env bash
# One short device call (issue 13, after call 34): does reading the clock on
# every failed barrier try slow the wgmma kernel (call 34 measured every form
# 1.5-2.2x slower than Run 32), and how fast is grouped_gemm_combine's store
# after its rewrite (a warp per finished token)? Each phase has its own limit
# within BUDGET seconds (default 420).
#   1. at once: this tree's flex-gemm-bench, FlexCudaKernelsTests and
#      moe-run, and a copy of the tree whose barrierWait reads the clock on
#      every failed try (call 34's), its flex-gemm-bench alone;
#   2. grouped_gemm_combine's kernel test (bits, fp64, every path);
#   3. flex-gemm-bench over C3 and decode shapes with each build, one after
#      the other on the same card;
#   4. the decode layers D1 and D2 with the pair and the fused step
#      (bench/plans from make_plans.sh with
#      FLEX_PLAN_OPTIONS="fuse-activation-backward=true fuse-combine=true");
#   5. compute-sanitizer memcheck over the combine's test.
#
#   bench/gpu_wait_probe.sh   (device machine; at most BUDGET seconds)
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUDGET="${BUDGET:-420}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FLEX_WGMMA=1
mkdir -p "$OUT"
exec > >(tee "$OUT/probe-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-unknown}"
status=0
limit() {
  local left=$((BUDGET - SECONDS))
  echo $(( left < $1 ? left : $1 ))
}
configure() { # source build
  cmake -S "$1" -B "$2" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release > /dev/null
}

echo "=== build ($SECONDS s)"
# The clock-per-try variant: barrierWait as call 34 ran it.
old=/tmp/flex-old-wait
rm -rf "$old" && mkdir -p "$old" && cp -r CMakeLists.txt cmake include lib tools \
  unittests test python examples "$old"/ 2>/dev/null
python3 - "$old/lib/Runtime/Cuda/HopperPrimitives.cuh" <<'EOF'
import re, sys
path = sys.argv[1]
s = open(path).read()
start = s.index("template <bool ClusterScope = false>\n__device__ __forceinline__ void barrierWait")
end = s.index("}\n", s.index("__trap();", start)) + 2
end = s.index("}\n", end) + 2
s = s[:start] + '''template <bool ClusterScope = false>
__device__ __forceinline__ void barrierWait(uint32_t bar, uint32_t parity) {
  if (barrierTryWait<ClusterScope>(bar, parity))
    return;
  const uint64_t start = globalNanoseconds();
  while (!barrierTryWait<ClusterScope>(bar, parity))
    if (globalNanoseconds() - start > kBarrierWaitLimitNs)
      __trap();
}
''' + s[end:]
open(path, "w").write(s)
EOF
grep -A8 "void barrierWait" "$old/lib/Runtime/Cuda/HopperPrimitives.cuh" | head -9
( configure . build-gpu && timeout "$(limit 260)" ninja -C build-gpu \
    flex-gemm-bench FlexCudaKernelsTests moe-run ) > "$OUT/probe-build.log" 2>&1 &
p1=$!
( configure "$old" build-old && timeout "$(limit 260)" ninja -C build-old \
    flex-gemm-bench ) > "$OUT/probe-build-old.log" 2>&1 &
p2=$!
wait $p1 || { echo "build FAILED"; grep -E "error" "$OUT/probe-build.log" | head; exit 1; }
wait $p2 || { echo "old-wait build FAILED"; grep -E "error" "$OUT/probe-build-old.log" | head; }

echo "=== combine test ($SECONDS s)"
timeout "$(limit 60)" build-gpu/unittests/Cuda/FlexCudaKernelsTests \
  --gtest_filter='CudaGemmCombine.*' > "$OUT/probe-combine.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |Failure|^\[ path" "$OUT/probe-combine.log" | sort | uniq -c | head -20

echo "=== gemm bench ($SECONDS s)"
for build in build-gpu build-old; do
  [[ -x $build/bin/flex-gemm-bench ]] || continue
  (( BUDGET - SECONDS > 40 )) || break
  echo "--- $build"
  timeout "$(limit 60)" "$build/bin/flex-gemm-bench" --iters 10 \
    --only c3,decode_t512,decode_t256 > "$OUT/probe-bench-$build.log" 2>&1
  cat "$OUT/probe-bench-$build.log"
done

echo "=== layers ($SECONDS s)"
layer() { # label plan variant
  (( BUDGET - SECONDS > 15 )) || { echo "$2 $1: skipped (budget)"; return; }
  timeout "$(limit 30)" build-gpu/bin/moe-run "bench/plans/$2.json" --device cuda \
    --iters 20 --variant "$3" --json > "$OUT/probe-$2-$1.json" 2> "$OUT/probe-$2-$1.err" ||
    { echo "$2 $1: failed"; tail -3 "$OUT/probe-$2-$1.err"; status=1; return; }
  python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
f = d['forward']
steps = [(x['op'], round(x['mean_us'], 1)) for x in f['steps']
         if 'gemm' in x['op'] or x['op'] == 'combine']
print(f'{sys.argv[2]:18s} {sys.argv[3]:8s} {d[\"variant\"]:24s} forward median {f[\"median_us\"]:8.1f} us {steps}')
" "$OUT/probe-$2-$1.json" "$2" "$1"
}
for plan in d1_dropless.infer d2_dropless.infer; do
  [[ -f bench/plans/$plan.json ]] || continue
  layer pair "$plan" single+gather
  layer combine "$plan" single+gather+combine
done

if (( BUDGET - SECONDS > 30 )); then
  echo "=== memcheck ($SECONDS s)"
  timeout "$(limit 60)" compute-sanitizer --tool memcheck --error-exitcode 3 \
    build-gpu/unittests/Cuda/FlexCudaKernelsTests --gtest_filter='CudaGemmCombine.*' \
    > "$OUT/probe-memcheck.log" 2>&1
  echo "memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$OUT/probe-memcheck.log" | tail -1))"
fi
echo "done in $SECONDS s; overall $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
