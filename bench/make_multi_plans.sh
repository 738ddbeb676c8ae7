#!/usr/bin/env bash
# Compiles the multi-rank benchmark plans HERE (the GPU machine has no MLIR):
# C1 and C3 (16384 tokens per GPU) in both capacity modes, with
# the variants r1d1 (expert parallel), r1d2 and r1d4 (expert parallel, 2 or 4
# pipelined chunks) and r0d1 (data parallel), training (forward+backward) plans, for
# 2 and 4 ranks (MULTI_RANKS), into bench/plans/mr<W>_<layer>.train.json; for 4
# ranks also mr4_<layer>_2dh.train.json (r1d1, r1d2 with ranks_per_node 2). They travel with the device call
# (carry: bench/plans) for bench/gpu_multi.sh.
# usage: bench/make_multi_plans.sh [BUILD_DIR]   (default: build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
opt="$build/bin/moe-opt"
translate="$build/bin/moe-translate"
for tool in "$opt" "$translate"; do
  [[ -x "$tool" ]] || { echo "make_multi_plans.sh: $tool not found; build the compiler first" >&2; exit 1; }
done
out="$root/bench/plans"
mkdir -p "$out"
# compile NAME RANKS OUT [PASS...]: one training plan of bench/layers/NAME.
compile() {
  local name=$1 ranks=$2 plan=$3; shift 3
  local layer="$root/bench/layers/$name.mlir"
  "$opt" "$layer" "$@" --moe-lower-to-plan="training=true" \
    | "$translate" --moert-to-plan > "$plan.tmp" \
    || { echo "make_multi_plans.sh: compiling $layer for $ranks ranks failed" >&2; rm -f "$plan.tmp"; exit 1; }
  [[ -s "$plan.tmp" ]] || { echo "make_multi_plans.sh: empty plan for $layer" >&2; exit 1; }
  mv "$plan.tmp" "$plan"
  echo "$plan"
}
for ranks in ${MULTI_RANKS:-2 4}; do
  for name in c1_cap1 c1_dropless c3_cap1 c3_dropless; do
    compile "$name" "$ranks" "$out/mr${ranks}_$name.train.json" \
      --moe-multiversion="ranks=$ranks variants=r1d1,r1d2,r1d4,r0d1"
  done
  # 2DH with a simulated node of 2 GPUs: same results, two-phase exchange.
  if (( ranks > 2 )); then
    for name in c1_cap1 c3_cap1; do
      compile "$name" "$ranks" "$out/mr${ranks}_${name}_2dh.train.json" \
        --moe-multiversion="ranks=$ranks variants=r1d1,r1d2" \
        --moe-a2a-2dh="ranks-per-node=2"
    done
  fi
done
git -C "$root" rev-parse HEAD > "$out/COMPILER_COMMIT" 2>/dev/null || true
