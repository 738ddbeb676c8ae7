#!/bin/sh
# ===- make_shard_plans.sh - Compiled plans of experts sharded over ranks --=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Writes the mr_shard_*.json plans: layers with fewer experts than ranks
# (E < W), each expert sharded over s = W / E ranks, compiled with
# --moe-multiversion; variants r<s>d1 and r<s>d2 (the exchange over shards,
# 1 and 2 chunks), r0d1 (shards gathered) and, for each r with 1 <= r < s,
# r<r>d1 (r2d2 too on 4 ranks with s = 4): shard groups of g = s / r ranks
# gather their shards, each token class exchanges among W / g ranks:
#   mr_shard_ffn_e1_w2_train        shard_ffn_e1.mlir on 2 ranks (s = 2)
#   mr_shard_gated_e2_w4_train      shard_gated_e2.mlir on 4 ranks (s = 2)
#   mr_shard_ffn_e2_w4_train_bf16   shard_ffn_e2.mlir on 4 ranks (s = 2), 2DH
#   mr_shard_ffn_e1_w4_train        shard_ffn_e1.mlir on 4 ranks (s = 4), 2DH
#   bad_shard_i32_rows              shard_ffn_e1.mlir with T = 2^29 on 4 ranks:
#                                   E * C fits i32 but E * s * C = 2^31 does
#                                   not (the loader must reject it; never run)
# (2DH: --moe-a2a-2dh, 2 nodes of 2 ranks; the grouped exchanges of
# 1 <= r < s stay flat.) Committed so the runtime tests run without the
# compiler; rerun after compiler changes that alter the
# plans. Usage, from the repository root:
#   sh unittests/Runtime/plans/make_shard_plans.sh [build dir, default build]
#
# ===----------------------------------------------------------------------=== #
set -e
bin=${1:-build}/bin
dir=unittests/Runtime/plans
compile() { # layer ranks variants out [extra passes]
  "$bin/moe-opt" "$dir/$1" --moe-multiversion="ranks=$2 variants=$3" $5 \
    --moe-lower-to-plan="training=true" |
    "$bin/moe-translate" --moert-to-plan >"$dir/$4"
}
compile shard_ffn_e1.mlir 2 r2d1,r2d2,r0d1,r1d1 mr_shard_ffn_e1_w2_train.json
compile shard_gated_e2.mlir 4 r2d1,r2d2,r0d1,r1d1 \
  mr_shard_gated_e2_w4_train.json
compile shard_ffn_e2.mlir 4 r2d1,r2d2,r0d1,r1d1 \
  mr_shard_ffn_e2_w4_train_bf16.json --moe-a2a-2dh="ranks-per-node=2"
compile shard_ffn_e1.mlir 4 r4d1,r4d2,r0d1,r2d1,r2d2,r1d1 \
  mr_shard_ffn_e1_w4_train.json --moe-a2a-2dh="ranks-per-node=2"
sed 's/<12x8xf32>/<536870912x8xf32>/g' "$dir/shard_ffn_e1.mlir" |
  "$bin/moe-opt" --moe-multiversion="ranks=4 variants=r4d1" \
    --moe-lower-to-plan="training=false" |
  "$bin/moe-translate" --moert-to-plan >"$dir/bad_shard_i32_rows.json"
