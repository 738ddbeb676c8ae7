// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=2" --moe-pipeline="chunks=2" | FileCheck %s

// The exchange of an expert-parallel layer is split into 2 capacity chunks:
// two [L, W * C / 2, d] chunks, one expert op each, one combine exchange of
// both.

// CHECK-LABEL: func.func @fixed
// CHECK: %[[IN:.+]]:2 = moe.all_to_all dispatch %{{.+}} {ranks = 2 : i64} : tensor<4x8x8xf32> -> tensor<2x8x8xf32>, tensor<2x8x8xf32>
// CHECK: %[[Y0:.+]] = moe.expert ffn<relu> %[[IN]]#0
// CHECK: %[[Y1:.+]] = moe.expert ffn<relu> %[[IN]]#1
// CHECK: moe.all_to_all combine %[[Y0]], %[[Y1]] {ranks = 2 : i64} : tensor<2x8x8xf32>, tensor<2x8x8xf32> -> tensor<4x8x8xf32>
!r = !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = 8>
func.func @fixed(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>,
                 %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>)
    -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>}
      : tensor<16x8xf32>, tensor<8x4xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<4x8x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2
      : (tensor<4x8x8xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>) -> tensor<4x8x8xf32>
  %out = moe.combine %y, %r : tensor<4x8x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}

// -----

// A dynamic capacity aligned to the degree pipelines too: [L, ?, d] chunks.

// CHECK-LABEL: func.func @dropless
// CHECK: moe.all_to_all dispatch {{.+}} -> tensor<2x?x8xf32>, tensor<2x?x8xf32>
!r = !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = ?>
func.func @dropless(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>,
                    %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>)
    -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<dropless, align = 2>}
      : tensor<16x8xf32>, tensor<8x4xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<4x?x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2
      : (tensor<4x?x8xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>) -> tensor<4x?x8xf32>
  %out = moe.combine %y, %r : tensor<4x?x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
