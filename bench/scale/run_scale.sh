#!/bin/bash
# ===- run_scale.sh - Predicted layer time per variant, W = 8 ... 2048 ----=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# "Past the machines" (docs/CostModel.md; issue 11, item 5). Here, on the
# CPU, with moe-opt built: compiles each layer for W = 8, 16, ..., 2048 with
# every variant moe-multiversion supports (r = 0 and every r dividing
# s = W / E, d in 1, 2, 4 for r >= 1) once flat and once with the 2DH
# exchange (--moe-a2a-2dh, nodes of 8; W > 8 only), as training plans; runs
# moe-scale on each layer's plans with the node shape NODE_SHAPE and the
# profile PROFILE (default: the built-in cuda one); writes
# bench/scale/scale.json, scale.txt (moe-scale's tables) and, with
# matplotlib, scale.png and scale.md (report_scale.py).
#
# Layers (bf16, fp32 router, capacity factor 1.0, FFN relu, top-2):
#   c1      C1 of PERF.md: T 16384 per GPU, d = h = 4096, E 8 (W > 8 shards
#           each expert over s = W / 8 GPUs: r matters);
#   ew16k   one expert per GPU (E = W), C1's experts, T 16384 per GPU;
#   ew4k    the same with T 4096 per GPU (smaller messages: latency-bound).
#
# Knobs: BUILD (default build), WORLD_SIZES, LAYERS, PROFILE, NODE_SHAPE,
# PLANS (the compiled plans, default $BUILD/scale-plans), OUT (default
# bench/scale), VENV (a venv with matplotlib, default $BUILD/scale-venv;
# made with pip when missing unless NO_PLOT=1).
#
# ===----------------------------------------------------------------------=== #
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
BIN=$BUILD/bin
WORLD_SIZES=${WORLD_SIZES:-"8 16 32 64 128 256 512 1024 2048"}
LAYERS=${LAYERS:-"c1 ew16k ew4k"}
NODE_SHAPE=${NODE_SHAPE:-bench/scale/dgx_h100.json}
PROFILE=${PROFILE:-}
PLANS=${PLANS:-$BUILD/scale-plans}
OUT=${OUT:-bench/scale}
VENV=${VENV:-$BUILD/scale-venv}
PER_NODE=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['gpus_per_node'])" "$NODE_SHAPE")
mkdir -p "$PLANS" "$OUT"

# The layer's .mlir for W ranks (E = 8, or E = W).
layer_mlir() {
  local layer=$1 w=$2 t e
  case $layer in
  c1) cat examples/c1_ffn_relu.mlir; return ;;
  ew16k) t=16384 e=$w ;;
  ew4k) t=4096 e=$w ;;
  *) echo "unknown layer $layer" >&2; exit 2 ;;
  esac
  local d=4096 h=4096
  cat <<EOF
func.func @$layer(%x: tensor<${t}x${d}xbf16>, %wg: tensor<${d}x${e}xf32>,
                  %w1: tensor<${e}x${d}x${h}xbf16>, %w2: tensor<${e}x${h}x${d}xbf16>)
    -> (tensor<${t}x${d}xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>, normalize}
      : (tensor<${t}x${d}xbf16>, tensor<${d}x${e}xf32>, tensor<${e}x${d}x${h}xbf16>,
         tensor<${e}x${h}x${d}xbf16>) -> (tensor<${t}x${d}xbf16>, tensor<f32>)
  return %out, %aux : tensor<${t}x${d}xbf16>, tensor<f32>
}
EOF
}

# Every variant for W ranks and E experts: r0d1, and r<R>d<D> for R
# dividing s = W / E (1 when E >= W), D in 1 2 4.
variants() {
  local w=$1 e=$2 s=1 r d list=r0d1
  ((e < w)) && s=$((w / e))
  for ((r = 1; r <= s; r++)); do
    ((s % r == 0)) || continue
    for d in 1 2 4; do list="$list,r${r}d${d}"; done
  done
  echo "$list"
}

experts_of() { if [ "$1" = c1 ]; then echo 8; else echo "$2"; fi; }

compile() {
  local layer=$1 w=$2 twodh=$3 out=$4 e
  e=$(experts_of "$layer" "$w")
  local passes=(--moe-multiversion="ranks=$w variants=$(variants "$w" "$e")")
  [ "$twodh" = 1 ] && passes+=(--moe-a2a-2dh="ranks-per-node=$PER_NODE")
  layer_mlir "$layer" "$w" |
    "$BIN/moe-opt" "${passes[@]}" --moe-lower-to-plan="training=true" |
    "$BIN/moe-translate" --moert-to-plan >"$out"
}

profile_args=()
[ -n "$PROFILE" ] && profile_args=(--profile "$PROFILE")
: >"$OUT/scale.txt"
jsons=()
for layer in $LAYERS; do
  plans=()
  for w in $WORLD_SIZES; do
    compile "$layer" "$w" 0 "$PLANS/${layer}_w${w}.json"
    plans+=("$PLANS/${layer}_w${w}.json")
    if ((w > PER_NODE)); then
      compile "$layer" "$w" 1 "$PLANS/${layer}_w${w}_2dh.json"
      plans+=("$PLANS/${layer}_w${w}_2dh.json")
    fi
  done
  echo "compiled ${#plans[@]} plans of $layer" >&2
  args=(--node-shape "$NODE_SHAPE" "${profile_args[@]}" --train --2dh-copies both)
  { echo "== $layer"; "$BIN/moe-scale" "${args[@]}" --summary "${plans[@]}"; echo; } \
    >>"$OUT/scale.txt"
  "$BIN/moe-scale" "${args[@]}" --json "${plans[@]}" >"$PLANS/$layer.scale.json"
  jsons+=("$layer=$PLANS/$layer.scale.json")
done

# One JSON of every layer (plan paths made relative), then the PNG and table.
python3 - "$OUT/scale.json" "${jsons[@]}" <<'EOF'
import json, sys
doc = {"tool": "bench/scale/run_scale.sh", "layers": {}}
for arg in sys.argv[2:]:
    name, path = arg.split("=", 1)
    data = json.load(open(path))
    for point in data["points"]:
        for v in point["variants"]:
            v["plan"] = v["plan"].rsplit("/", 1)[-1]
    doc["layers"][name] = data
json.dump(doc, open(sys.argv[1], "w"), indent=1)
EOF
echo "wrote $OUT/scale.json and $OUT/scale.txt" >&2

if [ "${NO_PLOT:-0}" != 1 ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q matplotlib
  fi
  "$VENV/bin/python" bench/scale/report_scale.py "$OUT/scale.json" \
    --png "$OUT/scale.png" --md "$OUT/scale.md"
fi
