// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=8" --verify-diagnostics

// [par-1] in --moe-parallelize: E % W == 0 (whole experts per rank) or
// W % E == 0 with the hidden size a multiple of s = W / E (each expert
// sharded over s ranks).

!r = !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = 8>
// expected-error @+1 {{[par-1] 4 experts on 8 ranks shard each expert over s = 2 ranks, but the hidden size 9 is not a multiple of s}}
func.func @hidden_not_a_multiple_of_shards(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>, %w1: tensor<4x8x9xf32>, %w2: tensor<4x9x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x4xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<4x8x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<4x8x8xf32>, tensor<4x8x9xf32>, tensor<4x9x8xf32>) -> tensor<4x8x8xf32>
  %out = moe.combine %y, %r : tensor<4x8x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}

// -----

!r = !moe.routing<tokens = 16, experts = 3, top_k = 2, capacity = 12>
// expected-error @+1 {{[par-1] 3 experts cannot be split evenly over 8 ranks (E % W must be 0, or W % E for experts sharded over W / E ranks)}}
func.func @fewer_experts_not_dividing(%x: tensor<16x8xf32>, %wg: tensor<8x3xf32>, %w1: tensor<3x8x12xf32>, %w2: tensor<3x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x3xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<3x12x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<3x12x8xf32>, tensor<3x8x12xf32>, tensor<3x12x8xf32>) -> tensor<3x12x8xf32>
  %out = moe.combine %y, %r : tensor<3x12x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}

// -----

!r = !moe.routing<tokens = 16, experts = 12, top_k = 2, capacity = 4>
// expected-error @+1 {{[par-1] 12 experts cannot be split evenly over 8 ranks (E % W must be 0, or W % E for experts sharded over W / E ranks)}}
func.func @uneven(%x: tensor<16x8xf32>, %wg: tensor<8x12xf32>, %w1: tensor<12x8x12xf32>, %w2: tensor<12x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x12xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<12x4x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<12x4x8xf32>, tensor<12x8x12xf32>, tensor<12x12x8xf32>) -> tensor<12x4x8xf32>
  %out = moe.combine %y, %r : tensor<12x4x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
