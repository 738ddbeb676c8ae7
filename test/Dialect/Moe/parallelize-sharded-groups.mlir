// RUN: moe-opt %s --moe-parallelize="ranks=4 r=1" | FileCheck %s --check-prefix=E2R1
// RUN: moe-opt %s --moe-parallelize="ranks=8 r=2" | FileCheck %s --check-prefix=E2R2

// Experts sharded over s = W / E ranks with 1 <= r < s: the g = s / r
// consecutive ranks of a shard group gather their shards as g local virtual
// experts (all_gather among `ranks` = g ranks), and each token class (the
// W / g ranks g apart) exchanges the dispatch buffer of E * s virtual
// experts among itself (all_to_all over W / g ranks, group_stride = g).

// E = 2, W = 4, s = 2, r = 1: g = 2, the exchange runs among 2 ranks.
// E2R1-LABEL: func.func @ffn
// E2R1-SAME: %[[X:[^:]+]]: tensor<16x8xf32>, %{{.+}}: tensor<8x2xf32>, %[[W1:[^:]+]]: tensor<1x8x6xf32>, %[[W2:[^:]+]]: tensor<1x6x8xf32>, %[[B1:[^:]+]]: tensor<1x6xf32>, %[[B2:[^:]+]]: tensor<1x8xf32>
// E2R1: %[[V:.+]] = moe.shard_routing %{{.+}} {shards = 2 : i64}
// E2R1: %[[D:.+]] = moe.dispatch %[[X]], %[[V]] {{.+}} -> tensor<4x8x8xf32>
// E2R1-DAG: %[[G1:.+]] = moe.all_gather %[[W1]] {ranks = 2 : i64} : tensor<1x8x6xf32> -> tensor<2x8x6xf32>
// E2R1-DAG: %[[G2:.+]] = moe.all_gather %[[W2]] {ranks = 2 : i64} : tensor<1x6x8xf32> -> tensor<2x6x8xf32>
// E2R1-DAG: moe.all_gather %[[B2]] {ranks = 2 : i64} : tensor<1x8xf32> -> tensor<2x8xf32>
// E2R1: %[[C:.+]] = moe.all_to_all dispatch %[[D]] {group_stride = 2 : i64, ranks = 2 : i64} : tensor<4x8x8xf32> -> tensor<2x16x8xf32>
// E2R1: %[[Y:.+]] = moe.expert ffn<relu> %[[C]], %[[G1]], %[[G2]] {{.+}} {hidden_shards = 2 : i64}
// E2R1: moe.all_to_all combine %[[Y]] {group_stride = 2 : i64, ranks = 2 : i64} : tensor<2x16x8xf32> -> tensor<4x8x8xf32>

// E = 2, W = 8, s = 4, r = 2: g = 2, the exchange runs among 4 ranks 2 apart.
// E2R2-LABEL: func.func @ffn
// E2R2-SAME: tensor<1x8x3xf32>
// E2R2: moe.all_gather {{.+}} {ranks = 2 : i64} : tensor<1x8x3xf32> -> tensor<2x8x3xf32>
// E2R2: moe.all_to_all dispatch {{.+}} {group_stride = 2 : i64, ranks = 4 : i64} : tensor<8x8x8xf32> -> tensor<2x32x8xf32>

!r = !moe.routing<tokens = 16, experts = 2, top_k = 1, capacity = 8>
func.func @ffn(%x: tensor<16x8xf32>, %wg: tensor<8x2xf32>, %w1: tensor<2x8x12xf32>, %w2: tensor<2x12x8xf32>, %b1: tensor<2x12xf32>, %b2: tensor<2x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<16x8xf32>, tensor<8x2xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<16x8xf32>, !r -> tensor<2x8x8xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 bias(%b1, %b2) : (tensor<2x8x8xf32>, tensor<2x8x12xf32>, tensor<2x12x8xf32>, tensor<2x12xf32>, tensor<2x8xf32>) -> tensor<2x8x8xf32>
  %out = moe.combine %y, %r : tensor<2x8x8xf32>, !r -> tensor<16x8xf32>
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
