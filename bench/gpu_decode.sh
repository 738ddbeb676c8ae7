#!/usr/bin/env bash
# The grouped GEMM's paths inside whole layers, in ONE device call (issue 13,
# items 1 and 5): flex-gemm-bench, then moe-run on the decode, dropless and
# gated benchmark plans with FLEX_GROUPED_GEMM=cublas, device and auto
# (device also recorded as a graph), then the PyTorch layer on the decode
# configs, all on the same card. Needs bench/plans (bench/make_plans.sh)
# carried. Logs and the summary go to $OUT (default bench/out).
#
#   BUILD=/tmp/build-gpu bench/gpu_decode.sh   (device machine; ~4 minutes)
# Knobs: LAYERS (plan names), MODES, SHAPES (flex-gemm-bench --only; none:
# no GEMM bench), ITERS, VARIANTS (plan variants to time, e.g. "single
# single+gather auto"; default auto: the runtime's choice).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="${BUILD:-$root/build-gpu}"
PLANS="${PLANS:-$root/bench/plans}"
ITERS="${ITERS:-20}"
LAYERS="${LAYERS:-d1_dropless.infer d2_dropless.infer}"
MODES="${MODES:-cublas device device-graph}"
VARIANTS="${VARIANTS:-auto}"
SHAPES="${SHAPES:-c3,c3_t2048,decode_t512,decode_t256,decode_t128_big,decode_t32}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WORK="$(mktemp -d)"  # one file per run stays here; $OUT gets few files
mkdir -p "$OUT"
exec > >(tee "$OUT/decode-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
status=0
echo "=== build ($SECONDS s)"
if ! (cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF -DFLEX_ENABLE_TESTS=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
      timeout 330 ninja -C "$BUILD" flex-gemm-bench moe-run) > "$OUT/decode-build.log" 2>&1; then
  echo "build FAILED"; grep -E "error|Error" "$OUT/decode-build.log" | head -20; exit 1
fi
if [[ "$SHAPES" != none ]]; then
  echo "=== flex-gemm-bench ($SECONDS s)"
  timeout 150 "$BUILD/bin/flex-gemm-bench" --iters 8 --only "$SHAPES" > "$OUT/decode-gemm-bench.log" 2>&1
  rc=$?; (( rc == 0 )) || status=1
  cat "$OUT/decode-gemm-bench.log"; echo "gemm-bench: exit $rc"
fi

echo "=== layers ($SECONDS s)"
for layer in $LAYERS; do
  plan="$PLANS/$layer.json"
  [[ -f "$plan" ]] || { echo "$layer: no plan"; status=1; continue; }
  train=""; [[ $layer == *.train ]] && train="--train"
  for variant in $VARIANTS; do
  for mode in $MODES; do
    impl=${mode%-graph}; graph=""; [[ $mode == *-graph ]] && graph="--graph"
    pick=""; [[ $variant != auto ]] && pick="--variant $variant"
    log="$WORK/$layer-$variant-$mode.txt"
    FLEX_GROUPED_GEMM=$impl timeout 120 "$BUILD/bin/moe-run" "$plan" --device cuda \
      $train $graph $pick --iters "$ITERS" --warmup 3 > "$log" 2>&1
    rc=$?; (( rc == 0 )) || status=1
    cat "$log" >> "$OUT/decode-layers.txt"
    echo "$layer $variant $mode (exit $rc): $(grep -E '^(forward|backward):' "$log" | sed 's/ per call.*median/ median/; s/, min.*//' | tr '\n' ' ')"
  done
  done
done
echo "=== PyTorch decode rows ($SECONDS s)"
timeout 150 python3 -u bench/torch_moe_layer.py --configs d1,d2 --modes dropless --iters "$ITERS" \
  --out "$OUT/decode-torch.json" > "$OUT/decode-torch.log" 2>&1
rc=$?; (( rc == 0 )) || status=1
tail -25 "$OUT/decode-torch.log"; echo "torch: exit $rc"
echo "done in $SECONDS s; overall $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
