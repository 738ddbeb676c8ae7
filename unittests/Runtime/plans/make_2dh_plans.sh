#!/bin/sh
# ===- make_2dh_plans.sh - Compiled multi-rank plans with 2DH all_to_all --=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Writes mr_small_ffn_2dh_w4_train.json: examples/small_ffn.mlir compiled for
# 4 ranks on 2 nodes of 2 (--moe-a2a-2dh, so every all_to_all has
# "ranks_per_node": 2), variants r1d1 and r1d2 (expert parallel, 1 and 2
# chunks). Committed so the mpirun tests run without the compiler; rerun after
# compiler changes that alter the plan. Usage, from the repository root:
#   sh unittests/Runtime/plans/make_2dh_plans.sh [build dir, default build]
#
# ===----------------------------------------------------------------------=== #
set -e
bin=${1:-build}/bin
"$bin/moe-opt" examples/small_ffn.mlir \
  --moe-multiversion="ranks=4 variants=r1d1,r1d2" \
  --moe-a2a-2dh="ranks-per-node=2" --moe-lower-to-plan="training=true" |
  "$bin/moe-translate" --moert-to-plan \
    >unittests/Runtime/plans/mr_small_ffn_2dh_w4_train.json
