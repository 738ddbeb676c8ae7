// RUN: moe-opt %s --moe-multiversion="ranks=8 variants=r2d2,r1d1,r4d1,r0d1" | FileCheck %s --check-prefix=MULTI
// RUN: moe-opt %s --moe-multiversion="ranks=8 variants=r2d1" --convert-moe-to-moert="training=true" | FileCheck %s

// E = 2 experts on W = 8 ranks: s = 4 shards each. Every divisor r of s in
// one plan, pipelined too. With r = 2 (g = 2) the shard group of 2
// consecutive ranks gathers its shards (group_size = 2, group_stride = 1),
// each token class exchanges among 4 ranks 2 apart (group_size = 4,
// group_stride = 2) over g = 2 local virtual experts, and the gradients of
// the gathered shards are reduce-scattered over the shard group.

// MULTI-LABEL: func.func @layer__r2d2
// MULTI: moe.all_gather {{.+}} {ranks = 2 : i64}
// MULTI: moe.all_to_all dispatch {{.+}} {group_stride = 2 : i64, ranks = 4 : i64} : tensor<8x8x8xf32> -> tensor<2x16x8xf32>, tensor<2x16x8xf32>
// MULTI-LABEL: func.func @layer__r1d1
// MULTI: moe.all_gather {{.+}} {ranks = 4 : i64} : tensor<1x8x3xf32> -> tensor<4x8x3xf32>
// MULTI: moe.all_to_all dispatch {{.+}} {group_stride = 4 : i64, ranks = 2 : i64} : tensor<8x8x8xf32> -> tensor<4x16x8xf32>
// MULTI-LABEL: func.func @layer__r4d1
// MULTI-NOT: moe.all_gather
// MULTI: moe.all_to_all dispatch {{.+}} {ranks = 8 : i64}
// MULTI-LABEL: func.func @layer__r0d1
// MULTI: moe.all_gather {{.+}} {ranks = 8 : i64} : tensor<1x8x3xf32> -> tensor<8x8x3xf32>
// MULTI-NOT: moe.all_to_all

// CHECK-LABEL: moert.plan @layer
// CHECK: moert.argument "w1" input : memref<1x8x3xf32>
// CHECK: moert.shard_routing {{.+}} {shards = 4 : i64}
// CHECK: moert.all_gather ins(input = {{.+}} : memref<1x8x3xf32>) outs(output = {{.+}} : memref<2x8x3xf32>) {group_size = 2 : i64, group_stride = 1 : i64}
// CHECK: moert.all_to_all {{.+}} {chunk = 0 : i64, chunks = 1 : i64, direction = #moert<direction dispatch>, group_size = 4 : i64, group_stride = 2 : i64, ranks_per_node = 0 : i64}
// CHECK: moert.uniform_segments {{.+}} outs(expert_offsets = {{.+}} : memref<3xi32>, expert_rows = {{.+}} : memref<2xi32>) {chunk = 0 : i64, chunks = 1 : i64, groups = 2 : i64, ranks = 4 : i64}
// CHECK: moert.grouped_gemm {{.+}}bias_scale = 2.500000e-01
// CHECK: moert.all_to_all {{.+}}direction = #moert<direction combine>, group_size = 4 : i64, group_stride = 2 : i64
// CHECK: moert.reduce_scatter ins(input = {{.+}} : memref<2x8x3xf32>) outs(output = {{.+}} : memref<1x8x3xf32>) {group_size = 2 : i64, group_stride = 1 : i64}
// CHECK: moert.reduce_scatter ins(input = {{.+}} : memref<2x8xf32>) outs(output = {{.+}} : memref<1x8xf32>) {group_size = 2 : i64, group_stride = 1 : i64}

func.func @layer(%x: tensor<16x8xf32>, %wg: tensor<8x2xf32>, %w1: tensor<2x8x12xf32>, %w2: tensor<2x12x8xf32>, %b1: tensor<2x12xf32>, %b2: tensor<2x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 bias(%b1, %b2) {top_k = 1, capacity = #moe.capacity<fixed 1.0>} : (tensor<16x8xf32>, tensor<8x2xf32>, tensor<2x8x12xf32>, tensor<2x12x8xf32>, tensor<2x12xf32>, tensor<2x8xf32>) -> (tensor<16x8xf32>, tensor<f32>)
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
