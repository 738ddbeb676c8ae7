#!/usr/bin/env bash
# Compiles the benchmark layers (bench/layers/*.mlir) to plan files in
# bench/plans/, HERE, with the project's compiler: the GPU machine has no MLIR,
# so the plans travel with the device call (carry: bench/plans).
# Each layer gives two plans: <name>.infer.json (forward timing: no saved
# activations) and <name>.train.json (forward+backward timing); a decode layer
# (a line "// bench: decode" in its .mlir) gives the inference plan only: it is
# timed forward only, and the device call's time goes to what is measured.
# usage: bench/make_plans.sh [BUILD_DIR]   (default: build)
# FLEX_PLAN_OPTIONS (e.g. "fuse-activation-backward=true") is appended to
# --moe-lower-to-plan's options for every plan.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
opt="$build/bin/moe-opt"
translate="$build/bin/moe-translate"
for tool in "$opt" "$translate"; do
  [[ -x "$tool" ]] || { echo "make_plans.sh: $tool not found; build the compiler first (cmake --build $build)" >&2; exit 1; }
done
out="$root/bench/plans"
mkdir -p "$out"
shopt -s nullglob
layers=("$root"/bench/layers/*.mlir)
(( ${#layers[@]} )) || { echo "make_plans.sh: no layers in bench/layers" >&2; exit 1; }
for layer in "${layers[@]}"; do
  name="$(basename "$layer" .mlir)"
  modes="infer train"
  if grep -q '^// bench: decode' "$layer"; then
    modes="infer"
    rm -f "$out/$name.train.json"  # a stale one would be timed by mistake
  fi
  for mode in $modes; do
    training=false; [[ $mode == train ]] && training=true
    plan="$out/$name.$mode.json"
    # Write to a temporary file so a failed compile leaves no half plan.
    "$opt" "$layer" --moe-lower-to-plan="training=$training${FLEX_PLAN_OPTIONS:+ $FLEX_PLAN_OPTIONS}" \
      | "$translate" --moert-to-plan > "$plan.tmp" \
      || { echo "make_plans.sh: compiling $layer (training=$training) failed" >&2; rm -f "$plan.tmp"; exit 1; }
    [[ -s "$plan.tmp" ]] || { echo "make_plans.sh: empty plan for $layer" >&2; exit 1; }
    mv "$plan.tmp" "$plan"
    echo "$plan"
  done
done
# Record which compiler commit made them (the device run reports it).
git -C "$root" rev-parse HEAD > "$out/COMPILER_COMMIT" 2>/dev/null || true
