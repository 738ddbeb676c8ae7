// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=8" --verify-diagnostics

// [par-1] in --moe-parallelize: whole experts per rank only (sharding an
// expert over ranks, E < W, comes later), and E % W == 0.

!r = !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = 8>
// expected-error @+1 {{[par-1] 4 experts on 8 ranks needs experts sharded over ranks (E < W), which is not supported yet}}
func.func @fewer_experts_than_ranks(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>, %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x4xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<4x8x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<4x8x8xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>) -> tensor<4x8x8xf32>
  %out = moe.combine %y, %r : tensor<4x8x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}

// -----

!r = !moe.routing<tokens = 16, experts = 12, top_k = 2, capacity = 4>
// expected-error @+1 {{[par-1] 12 experts cannot be split evenly over 8 ranks (E % W must be 0)}}
func.func @uneven(%x: tensor<16x8xf32>, %wg: tensor<8x12xf32>, %w1: tensor<12x8x12xf32>, %w2: tensor<12x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x12xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<12x4x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<12x4x8xf32>, tensor<12x8x12xf32>, tensor<12x12x8xf32>) -> tensor<12x4x8xf32>
  %out = moe.combine %y, %r : tensor<12x4x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
