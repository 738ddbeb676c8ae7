#!/usr/bin/env bash
# Compiles the 2-rank benchmark plans HERE (the GPU machine has no MLIR):
# C1 and C3 (16384 tokens per GPU) in both capacity modes, for 2 ranks with
# the variants r1d1 (expert parallel), r1d2 and r1d4 (expert parallel, 2 or 4
# pipelined chunks) and r0d1 (data parallel), training (forward+backward) plans, into
# bench/plans/mr2_<layer>.train.json. They travel with the device call
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
for name in c1_cap1 c1_dropless c3_cap1 c3_dropless; do
  layer="$root/bench/layers/$name.mlir"
  plan="$out/mr2_$name.train.json"
  "$opt" "$layer" --moe-multiversion="ranks=2 variants=r1d1,r1d2,r1d4,r0d1" \
      --moe-lower-to-plan="training=true" \
    | "$translate" --moert-to-plan > "$plan.tmp" \
    || { echo "make_multi_plans.sh: compiling $layer failed" >&2; rm -f "$plan.tmp"; exit 1; }
  [[ -s "$plan.tmp" ]] || { echo "make_multi_plans.sh: empty plan for $layer" >&2; exit 1; }
  mv "$plan.tmp" "$plan"
  echo "$plan"
done
git -C "$root" rev-parse HEAD > "$out/COMPILER_COMMIT" 2>/dev/null || true
