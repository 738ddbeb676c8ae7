// RUN: moe-opt %s --moe-parallelize="ranks=8" --moe-a2a-2dh="ranks-per-node=4" | FileCheck %s
// RUN: moe-opt %s --moe-parallelize="ranks=8" --moe-a2a-2dh="ranks-per-node=8" | FileCheck %s --check-prefix=ONE-NODE
// RUN: not moe-opt %s --moe-parallelize="ranks=8" --moe-a2a-2dh="ranks-per-node=3" 2>&1 | FileCheck %s --check-prefix=BAD

// 8 ranks on 2 nodes of 4: both exchanges go hierarchical.
// CHECK: moe.all_to_all dispatch {{.+}} {ranks = 8 : i64, ranks_per_node = 4 : i64}
// CHECK: moe.all_to_all combine {{.+}} {ranks = 8 : i64, ranks_per_node = 4 : i64}

// One node: the flat exchange stays.
// ONE-NODE-NOT: ranks_per_node

// [a2a-1]: the node size divides the ranks.
// BAD: [a2a-1] ranks-per-node must divide the 8 ranks, got 3

!r = !moe.routing<tokens = 16, experts = 8, top_k = 2, capacity = 4>
func.func @layer(%x: tensor<16x8xf32>, %wg: tensor<8x8xf32>,
                 %w1: tensor<8x8x12xf32>, %w2: tensor<8x12x8xf32>)
    -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>}
      : tensor<16x8xf32>, tensor<8x8xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<8x4x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2
      : (tensor<8x4x8xf32>, tensor<8x8x12xf32>, tensor<8x12x8xf32>) -> tensor<8x4x8xf32>
  %out = moe.combine %y, %r : tensor<8x4x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
