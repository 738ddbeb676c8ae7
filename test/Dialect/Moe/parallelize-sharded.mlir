// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=4" | FileCheck %s --check-prefix=EXCHANGE
// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=4 r=2" | FileCheck %s --check-prefix=EXCHANGE
// RUN: moe-opt %s --split-input-file --moe-parallelize="ranks=4 r=0" | FileCheck %s --check-prefix=GATHER

// E = 2 experts on W = 4 ranks: each expert is sharded over s = 2 ranks.
// Rank j holds hidden units (j % 2) * 6 .. +6 of expert j / 2, b2 whole, and
// the layer routes to E * s = 4 virtual experts (one per rank).

// EXCHANGE-LABEL: func.func @ffn
// EXCHANGE-SAME: %[[X:[^:]+]]: tensor<16x8xf32>, %{{.+}}: tensor<8x2xf32>, %[[W1:[^:]+]]: tensor<1x8x6xf32>, %[[W2:[^:]+]]: tensor<1x6x8xf32>, %[[B1:[^:]+]]: tensor<1x6xf32>, %[[B2:[^:]+]]: tensor<1x8xf32>
// EXCHANGE: %[[R:.+]], %{{.+}} = moe.gate {{.+}}ranks = 4 {{.+}} -> !moe.routing<tokens = 16, experts = 2, top_k = 1, capacity = 8>
// EXCHANGE: %[[V:.+]] = moe.shard_routing %[[R]] {shards = 2 : i64} : {{.+}} -> !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = 8>
// EXCHANGE: %[[D:.+]] = moe.dispatch %[[X]], %[[V]] {{.+}} -> tensor<4x8x8xf32>
// EXCHANGE: %[[C:.+]] = moe.all_to_all dispatch %[[D]] {ranks = 4 : i64} : tensor<4x8x8xf32> -> tensor<1x32x8xf32>
// EXCHANGE: %[[Y:.+]] = moe.expert ffn<relu> %[[C]], %[[W1]], %[[W2]] bias(%[[B1]], %[[B2]]) {hidden_shards = 2 : i64}
// EXCHANGE: %[[BACK:.+]] = moe.all_to_all combine %[[Y]] {ranks = 4 : i64} : tensor<1x32x8xf32> -> tensor<4x8x8xf32>
// EXCHANGE: moe.combine %[[BACK]], %[[V]]

// GATHER-LABEL: func.func @ffn
// GATHER-SAME: tensor<1x8x6xf32>, %{{.+}}: tensor<1x6x8xf32>, %{{.+}}: tensor<1x6xf32>, %{{.+}}: tensor<1x8xf32>
// GATHER: moe.shard_routing
// GATHER-NOT: moe.all_to_all
// GATHER-DAG: moe.all_gather {{.+}} : tensor<1x8x6xf32> -> tensor<4x8x6xf32>
// GATHER-DAG: moe.all_gather {{.+}} : tensor<1x6x8xf32> -> tensor<4x6x8xf32>
// GATHER-DAG: moe.all_gather {{.+}} : tensor<1x8xf32> -> tensor<4x8xf32>
// GATHER: moe.expert ffn<relu> {{.+}} {hidden_shards = 2 : i64} : (tensor<4x8x8xf32>, tensor<4x8x6xf32>

!r = !moe.routing<tokens = 16, experts = 2, top_k = 1, capacity = 8>
func.func @ffn(%x: tensor<16x8xf32>, %wg: tensor<8x2xf32>, %w1: tensor<2x8x12xf32>, %w2: tensor<2x12x8xf32>, %b1: tensor<2x12xf32>, %b2: tensor<2x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x2xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<2x8x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 bias(%b1, %b2) : (tensor<2x8x8xf32>, tensor<2x8x12xf32>, tensor<2x12x8xf32>, tensor<2x12xf32>, tensor<2x8xf32>) -> tensor<2x8x8xf32>
  %out = moe.combine %y, %r : tensor<2x8x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}

// -----

// A gated expert with a dynamic capacity: W1 and W3 are split by columns,
// W2 by rows.

// EXCHANGE-LABEL: func.func @gated
// EXCHANGE-SAME: tensor<1x8x6xf32>, %{{.+}}: tensor<1x6x8xf32>, %{{.+}}: tensor<1x8x6xf32>
// EXCHANGE: moe.shard_routing {{.+}} -> !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = ?>
// EXCHANGE: moe.all_to_all dispatch {{.+}} : tensor<4x?x8xf32> -> tensor<1x?x8xf32>
// EXCHANGE: moe.expert gated {{.+}} up({{.+}}) {hidden_shards = 2 : i64}

// GATHER-LABEL: func.func @gated
// GATHER-COUNT-3: moe.all_gather

!r = !moe.routing<tokens = 16, experts = 2, top_k = 1, capacity = ?>
func.func @gated(%x: tensor<16x8xf32>, %wg: tensor<8x2xf32>, %w1: tensor<2x8x12xf32>, %w2: tensor<2x12x8xf32>, %w3: tensor<2x8x12xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<16x8xf32>, tensor<8x2xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<2x?x8xf32>
  %y = moe.expert gated %d, %w1, %w2 up(%w3) : (tensor<2x?x8xf32>, tensor<2x8x12xf32>, tensor<2x12x8xf32>, tensor<2x8x12xf32>) -> tensor<2x?x8xf32>
  %out = moe.combine %y, %r : tensor<2x?x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
