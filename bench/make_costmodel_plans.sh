#!/usr/bin/env bash
# The cost model's accuracy benchmark, part 1 (HERE, where the compiler is):
# writes 39 single-rank MoE layers from a template and compiles each to a
# plan in bench/costmodel_plans/<name>.json. bench/gpu_costmodel.sh runs them
# on the GPU against a profile calibrated in the same call
# (docs/CostModel.md, "The accuracy benchmark"). The layers vary T, d, h, E,
# k, the capacity (fixed 1.0, 1.25, dropless), the dtype (bf16, a few f32),
# the expert FFN (relu, gelu, gated SwiGLU) and training or inference; their
# weights stay modest so each GPU run takes a few seconds. Dropless layers
# and three fixed ones carry two variants, ragged and padded
# (layouts=padded,ragged); l33-l36 are decode-sized.
# usage: bench/make_costmodel_plans.sh [BUILD_DIR]   (default: build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
opt="$build/bin/moe-opt"
translate="$build/bin/moe-translate"
for tool in "$opt" "$translate"; do
  [[ -x "$tool" ]] || { echo "make_costmodel_plans.sh: $tool not found" >&2; exit 1; }
done
out="$root/bench/costmodel_plans"
rm -rf "$out" && mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# name T d h E k capacity dtype ffn mode
layers=(
  "l01 1024 1024 4096 8 1 fixed:1.0 bf16 relu infer"
  "l02 1024 1024 4096 8 2 fixed:1.25 bf16 gelu train"
  "l03 4096 1024 4096 8 2 fixed:1.0 bf16 relu train"
  "l04 4096 2048 4096 8 2 fixed:1.25 bf16 relu infer"
  "l05 4096 2048 5632 8 2 dropless bf16 gated train"
  "l06 16384 1024 4096 8 2 fixed:1.0 bf16 relu train"
  "l07 16384 2048 4096 8 2 fixed:1.0 bf16 relu infer"
  "l08 16384 2048 2048 16 1 fixed:1.25 bf16 gelu train"
  "l09 4096 2048 1408 64 6 fixed:1.0 bf16 relu train"
  "l10 16384 2048 1408 64 6 fixed:1.0 bf16 relu infer"
  "l11 4096 1024 1408 64 6 dropless bf16 gated train"
  "l12 1024 2048 1408 64 6 fixed:1.25 bf16 relu infer"
  "l13 4096 4096 2048 8 2 fixed:1.0 bf16 relu train"
  "l14 1024 1024 14336 8 2 dropless bf16 gated infer"
  "l15 4096 1024 2048 16 2 dropless bf16 relu train"
  "l16 16384 1024 2048 16 2 dropless bf16 gelu infer"
  "l17 1024 1024 2048 16 1 dropless bf16 relu train"
  "l18 4096 2048 2048 16 1 fixed:1.0 bf16 gated train"
  "l19 16384 1024 1408 64 6 fixed:1.25 bf16 gated train"
  "l20 4096 3072 3072 8 1 fixed:1.25 bf16 relu infer"
  "l21 1024 4096 2048 8 2 fixed:1.0 bf16 gelu infer"
  "l22 16384 1024 4096 8 1 dropless bf16 relu train"
  "l23 4096 1024 4096 16 2 fixed:1.25 bf16 gated infer"
  "l24 1024 2048 5632 8 2 fixed:1.0 bf16 relu train"
  "l25 1024 1024 2048 8 2 fixed:1.0 f32 relu train"
  "l26 4096 1024 1024 16 2 fixed:1.25 f32 gelu infer"
  "l27 4096 1024 2048 8 1 dropless f32 gated train"
  "l28 1024 2048 1408 64 6 fixed:1.0 f32 relu infer"
  "l29 16384 2048 1408 16 2 fixed:1.0 bf16 relu train"
  "l30 4096 1024 1408 64 6 fixed:1.25 bf16 gelu infer"
  "l31 16384 4096 2048 8 2 dropless bf16 gated infer"
  "l32 1024 1024 1024 64 2 dropless bf16 relu train"
  # Decode-sized (few tokens, many experts): the device-sized grouped GEMM's
  # regime, priced from the profile's device_gemm.
  "l33 256 2048 1408 64 6 dropless bf16 relu infer"
  "l34 128 4096 1536 64 8 dropless bf16 gated infer"
  "l35 512 2048 1408 64 6 dropless bf16 relu infer"
  "l36 64 2048 1408 64 6 dropless bf16 relu infer"
  # Fixed capacities with both row layouts (padded: one batched GEMM over
  # E * C rows; ragged: the kept rows only, sized on the device): more
  # choices for the pick metric.
  "l37 4096 1024 2048 16 2 fixed:1.25 bf16 relu train"
  "l38 16384 2048 1408 64 6 fixed:1.25 bf16 relu infer"
  "l39 1024 2048 1408 64 6 fixed:1.0 bf16 relu infer"
)
# Fixed-capacity layers that also keep both layouts.
two_layouts=" l37 l38 l39 "

# The calibration set (bench/costmodel_plans/calib/): other shapes than the
# 39 above, so the per-step figures fitted from them (moe-run --calibrate
# PROFILE calib/*.json) are judged on layers they never saw.
calibration=(
  "c01 2048 1024 2816 16 2 fixed:1.0 bf16 relu train"
  "c02 8192 2048 2048 32 4 fixed:1.25 bf16 gelu train"
  "c03 512 2048 4096 8 2 dropless bf16 gated train"
  "c04 2048 3072 1024 64 4 dropless bf16 relu train"
  "c05 8192 1024 1024 4 1 fixed:1.0 bf16 relu infer"
  "c06 2048 2048 2816 32 2 fixed:1.0 f32 gelu train"
  "c07 512 1024 1408 64 8 fixed:1.0 bf16 gated infer"
  "c08 8192 3072 4096 8 2 dropless bf16 relu infer"
  "c09 2048 1024 2048 16 2 dropless f32 relu train"
  "c10 4096 2048 1792 32 3 fixed:1.25 bf16 gated train"
)

# The layer's .mlir text (see examples/*.mlir): bf16 layers keep an fp32
# router, as the examples do.
layer_mlir() { # name T d h E k capacity dtype ffn
  local name=$1 T=$2 d=$3 h=$4 E=$5 k=$6 cap=$7 dt=$8 ffn=$9
  local capattr
  case "$cap" in
    dropless) capattr="dropless" ;;
    fixed:*) capattr="fixed ${cap#fixed:}" ;;
  esac
  local x="tensor<${T}x${d}x${dt}>" wg="tensor<${d}x${E}xf32>"
  local w1="tensor<${E}x${d}x${h}x${dt}>" w2="tensor<${E}x${h}x${d}x${dt}>"
  local head="ffn<$ffn>" up="" upty="" uparg=""
  if [[ "$ffn" == gated ]]; then
    head="gated"; up=" up(%w3)"; upty=", $w1"; uparg=", %w3: $w1"
  fi
  cat <<MLIR
// Cost model accuracy layer $name: T $T, d $d, h $h, E $E, top-$k, $ffn, $dt, capacity $cap.
func.func @$name(%x: $x, %wg: $wg, %w1: $w1, %w2: $w2$uparg)
    -> ($x, tensor<f32>) {
  %out, %aux = moe.layer $head %x, %wg, %w1, %w2$up
      {top_k = $k, capacity = #moe.capacity<$capattr>, normalize}
      : ($x, $wg, $w1, $w2$upty) -> ($x, tensor<f32>)
  return %out, %aux : $x, tensor<f32>
}
MLIR
}

mkdir -p "$out/calib"
for spec in "${layers[@]}" "${calibration[@]}"; do
  read -r name T d h E k cap dt ffn mode <<<"$spec"
  layer_mlir "$name" "$T" "$d" "$h" "$E" "$k" "$cap" "$dt" "$ffn" > "$tmp/$name.mlir"
  training=false; [[ $mode == train ]] && training=true
  # Dropless layers keep both expert row layouts as variants (one GPU's
  # choice, docs/CostModel.md): ragged first (the default), then padded.
  layouts=""
  [[ $cap == dropless || $two_layouts == *" $name "* ]] &&
    layouts=" layouts=padded,ragged"
  plan="$out/$name.$mode.json"
  [[ $name == c* ]] && plan="$out/calib/$name.$mode.json"
  "$opt" "$tmp/$name.mlir" --moe-lower-to-plan="training=$training$layouts" \
    | "$translate" --moert-to-plan > "$plan.tmp" \
    || { echo "make_costmodel_plans.sh: compiling $name failed" >&2; cat "$tmp/$name.mlir" >&2; rm -f "$plan.tmp"; exit 1; }
  [[ -s "$plan.tmp" ]] || { echo "make_costmodel_plans.sh: empty plan for $name" >&2; exit 1; }
  mv "$plan.tmp" "$plan"
  # The layer's shape, for the report.
  if [[ $name == c* ]]; then printf '%s\n' "$spec" >> "$out/calib/LAYERS"
  else printf '%s\n' "$spec" >> "$out/LAYERS"; fi
done
git -C "$root" rev-parse HEAD > "$out/COMPILER_COMMIT" 2>/dev/null || true
echo "make_costmodel_plans.sh: ${#layers[@]} + ${#calibration[@]} plans in $out ($(du -sh "$out" | cut -f1))"
