#!/bin/sh
# ===- make_plans.sh - moe-scale's test plans ------------------------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Writes the two small plans moe-scale's tests read: examples/small_ffn.mlir
# (E 8) compiled for 4 ranks (experts whole, variants r1d1, r1d2, r0d1) and
# for 16 ranks on nodes of 2 with the 2DH exchange (each expert sharded over
# s = 2 ranks: r2d1, r2d2, r1d1, r0d1; r1d1 exchanges among groups, flat),
# both training plans. Committed so the tests run without the compiler;
# rerun after compiler changes that alter plans. From the repository root:
#   sh tools/moe-scale/test/make_plans.sh [build dir, default build]
#
# ===----------------------------------------------------------------------=== #
set -e
bin=${1:-build}/bin
out=tools/moe-scale/test
"$bin/moe-opt" examples/small_ffn.mlir \
  --moe-multiversion="ranks=4 variants=r1d1,r1d2,r0d1" \
  --moe-lower-to-plan="training=true" |
  "$bin/moe-translate" --moert-to-plan >$out/small_ffn_w4_train.json
"$bin/moe-opt" examples/small_ffn.mlir \
  --moe-multiversion="ranks=16 variants=r2d1,r2d2,r1d1,r0d1" \
  --moe-a2a-2dh="ranks-per-node=2" --moe-lower-to-plan="training=true" |
  "$bin/moe-translate" --moert-to-plan >$out/small_ffn_w16_2dh_train.json
