// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=2" | FileCheck %s --check-prefix=EP
// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=2 r=0" | FileCheck %s --check-prefix=DP
// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=1" | FileCheck %s --check-prefix=ONE

// One parameter layout for both variants: each rank holds E / W = 2 of the
// 4 experts ([2, ...] weight arguments).
//
// r = 1: the dispatch buffer [E, C, d] = [4, 8, 8] is exchanged so this
// rank's 2 experts see their rows from both ranks ([2, 2 * 8, 8]).

// EP-LABEL: func.func @layer
// EP-SAME: %[[W1:[a-z0-9]+]]: tensor<2x8x12xf32>, %[[W2:[a-z0-9]+]]: tensor<2x12x8xf32>
// EP: %[[R:.+]], %{{.+}} = moe.gate {{.+}}ranks = 2 : i64
// EP: %[[D:.+]] = moe.dispatch
// EP: %[[IN:.+]] = moe.all_to_all dispatch %[[D]] {ranks = 2 : i64} : tensor<4x8x8xf32> -> tensor<2x16x8xf32>
// EP: %[[Y:.+]] = moe.expert ffn<relu> %[[IN]], %[[W1]], %[[W2]] : {{.+}} -> tensor<2x16x8xf32>
// EP: %[[BACK:.+]] = moe.all_to_all combine %[[Y]] {ranks = 2 : i64} : tensor<2x16x8xf32> -> tensor<4x8x8xf32>
// EP: moe.combine %[[BACK]], %[[R]]

// r = 0: every rank gathers both ranks' experts and keeps its tokens.

// DP-LABEL: func.func @layer
// DP-SAME: %[[W1:[a-z0-9]+]]: tensor<2x8x12xf32>, %[[W2:[a-z0-9]+]]: tensor<2x12x8xf32>
// DP: %[[D:.+]] = moe.dispatch
// DP: %[[F1:.+]] = moe.all_gather %[[W1]] {ranks = 2 : i64} : tensor<2x8x12xf32> -> tensor<4x8x12xf32>
// DP: %[[F2:.+]] = moe.all_gather %[[W2]] {ranks = 2 : i64} : tensor<2x12x8xf32> -> tensor<4x12x8xf32>
// DP: moe.expert ffn<relu> %[[D]], %[[F1]], %[[F2]] : {{.+}} -> tensor<4x8x8xf32>
// DP-NOT: moe.all_to_all

// One rank: nothing to do.
// ONE-LABEL: func.func @layer
// ONE-SAME: tensor<4x8x12xf32>
// ONE-NOT: moe.all_to_all
// ONE-NOT: moe.all_gather

!r = !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = 8>
func.func @layer(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>,
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
