// RUN: not moe-opt %s --split-input-file --moe-parallelize="ranks=2" --moe-pipeline="chunks=3" 2>&1 | FileCheck %s
// RUN: not moe-opt %s --split-input-file --moe-pipeline="chunks=2" 2>&1 | FileCheck %s --check-prefix=NOEP
// RUN: not moe-opt %s --split-input-file --moe-multiversion="ranks=2 variants=r0d2" 2>&1 | FileCheck %s --check-prefix=DP

// [pipe-1] in the passes: D must divide a static C (8 here) or the
// alignment of a dynamic one; pipelining needs expert parallelism.

// CHECK: error: 'moe.gate' op [pipe-1] 3 chunks must divide the capacity 8: align it (#moe.capacity<..., align = 3>)
// CHECK: error: 'moe.gate' op [pipe-1] 3 chunks must divide the capacity: align it to a multiple of 3 (#moe.capacity<..., align = 3>), got align = 2
// NOEP: error: 'func.func' op [pipe-1] pipelining overlaps the all-to-all with experts: it needs an expert-parallel layer
// DP: error: [pipe-1] variant 'r0d2': pipelining needs expert parallelism (r >= 1)

!r = !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = 8>
func.func @fixed(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>, %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x4xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<4x8x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<4x8x8xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>) -> tensor<4x8x8xf32>
  %out = moe.combine %y, %r : tensor<4x8x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}

// -----

!r = !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = ?>
func.func @dropless(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>, %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<dropless, align = 2>} : tensor<16x8xf32>, tensor<8x4xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<4x?x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<4x?x8xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>) -> tensor<4x?x8xf32>
  %out = moe.combine %y, %r : tensor<4x?x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}

// -----

func.func @layer(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>, %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 2, capacity = #moe.capacity<fixed 1.0>} : (tensor<16x8xf32>, tensor<8x4xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>)
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
