#!/bin/sh
# ===- make_layout_plans.sh - A plan of several expert-row layouts -------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Writes ffn_dropless_layouts_train.json: dropless_layouts.mlir compiled for
# training with the padded, ragged and aligned layouts as variants, each
# with its own workspace_bytes (the padded one several times the others).
# Committed so the runtime tests run without the compiler; rerun after
# compiler changes that alter the plan. From the repository root:
#   sh unittests/Runtime/plans/make_layout_plans.sh [build dir, default build]
#
# ===----------------------------------------------------------------------=== #
set -e
bin=${1:-build}/bin
dir=unittests/Runtime/plans
"$bin/moe-opt" "$dir/dropless_layouts.mlir" \
  --moe-lower-to-plan="training=true layouts=padded,ragged,aligned" |
  "$bin/moe-translate" --moert-to-plan > "$dir/ffn_dropless_layouts_train.json"
