#!/usr/bin/env bash
# The main job: installs what is missing, builds, then compiles example MoE
# layers and runs them, checking each against the fp64 reference.
#
#   scripts/run.sh                 the small examples, forward and backward,
#                                  checked; then the PERF.md layers compiled
#                                  to plans (their workspace and steps shown)
#   scripts/run.sh LAYER.mlir ...  these layers instead (forward + backward)
#
# Runs on the GPU when there is one (and the build has the CUDA backend),
# on the CPU otherwise; FLEX_DEVICE=cpu|cuda chooses.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
flex_build

bin="$FLEX_BUILD/bin"
examples="$FLEX_ROOT/examples"

device="${FLEX_DEVICE:-cpu}"
if [ -z "${FLEX_DEVICE:-}" ] && command -v nvidia-smi >/dev/null 2>&1 &&
   nvidia-smi -L >/dev/null 2>&1 &&
   [ -d "$FLEX_BUILD/lib/Runtime/Cuda" ]; then
  device=cuda
fi
echo "flex: running on $device"

# Every layer runs, a failure does not stop the others; the last line counts.
ran=0
failed=()
run_layer() {
  echo
  echo "=== $1 ($device)"
  ran=$((ran + 1))
  "$bin/moe-run" "$1" --device "$device" --train --check --iters 3 ||
    failed+=("$(basename "$1")")
}
verdict() {
  echo
  if [ ${#failed[@]} -eq 0 ]; then
    echo "flex: $ran of $ran layers passed (forward and backward against fp64)"
  else
    echo "flex: $((ran - ${#failed[@]})) of $ran layers passed; FAILED: ${failed[*]}"
    exit 1
  fi
}

if [ $# -gt 0 ]; then
  for layer in "$@"; do run_layer "$layer"; done
  verdict
  exit 0
fi

for layer in "$examples"/small_*.mlir; do run_layer "$layer"; done

# The PERF.md layers are too large to check on two CPU cores in seconds:
# compile them and show what the runtime would run.
for layer in c1_ffn_relu c3_fine_grained mixtral_swiglu; do
  echo
  echo "=== $examples/$layer.mlir (compiled, not run on the CPU)"
  "$bin/moe-opt" "$examples/$layer.mlir" --moe-lower-to-plan="training=true" \
    | "$bin/moe-translate" --moert-to-plan > "$FLEX_BUILD/$layer.plan.json"
  python3 - "$FLEX_BUILD/$layer.plan.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))
layer, variant = plan["layer"], plan["variants"][0]
print(f"plan     {sys.argv[1]}")
capacity = layer["capacity_mode"]
if capacity != "dropless":
    capacity += f" {layer['capacity_factor']}"
expert = layer["expert_kind"]
if expert == "ffn":
    expert += f"<{layer['activation']}>" + (" bias" if layer["bias"] else "")
routing = [f for f in ("normalize_gate", "batch_prioritized") if layer[f]]
print(f"layer    T={layer['tokens']} d={layer['model_dim']} "
      f"h={layer['hidden_dim']} E={layer['experts']} k={layer['top_k']} "
      f"{expert} {layer['dtype']}, capacity {capacity}, "
      f"routing {' '.join(routing) or 'plain'}")
print(f"workspace {plan['workspace']['bytes'] / 2**20:.1f} MiB for "
      f"{len(plan['workspace']['buffers'])} buffers")
print("forward  " + " ".join(s["op"] for s in variant["forward"]))
print("backward " + " ".join(s["op"] for s in variant["backward"]))
PY
done
verdict
