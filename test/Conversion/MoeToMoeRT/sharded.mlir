// RUN: moe-opt %s --moe-multiversion="ranks=2 variants=r2d1,r0d1" --convert-moe-to-moert="training=true" | FileCheck %s

// One expert sharded over 2 ranks (s = 2): the arguments are the rank's
// shard (h / s = 6 hidden units, b2 whole), the gate's routing is expanded
// to 2 virtual experts with k * s = 2 choices, fc2 adds b2 / 2, and the gate
// gradients of the two shards are summed back.

// CHECK-LABEL: moert.plan @layer
// CHECK-SAME: hidden_dim = 12,
// CHECK-SAME: world_size = 2
// CHECK: moert.argument "w1" input : memref<1x8x6xf32>
// CHECK: moert.argument "b1" input : memref<1x6xf32>
// CHECK: moert.argument "w2" input : memref<1x6x8xf32>
// CHECK: moert.argument "b2" input : memref<1x8xf32>
// CHECK: moert.argument "grad_b2" grad_output : memref<1x8xf32>

// r = s: the exchange over the shards of each expert.
// CHECK: moert.variant "r2d1" forward {
// CHECK: moert.gate {{.+}} outs(scores = {{.+}}, indices = %[[GI:[^ ]+]] : memref<12x1xi32>
// CHECK-NEXT: moert.shard_routing ins(indices = %[[GI]] : memref<12x1xi32>, {{.+}}) outs(indices = %[[VI:[^ ]+]] : memref<12x2xi32>, locations = %[[VL:[^ ]+]] : memref<12x2xi32>, gates = %[[VG:[^ ]+]] : memref<12x2xf32>, expert_offsets = %[[VO:[^ ]+]] : memref<3xi32>, expert_rows = %{{.+}} : memref<2xi32>) {shards = 2 : i64}
// CHECK-NEXT: moert.dispatch ins(x = {{.+}}, indices = %[[VI]] : memref<12x2xi32>, locations = %[[VL]] : {{.+}}, expert_offsets = %[[VO]] : memref<3xi32>) outs(dispatched = {{.+}} : memref<24x8xf32>)
// CHECK-NEXT: moert.all_to_all
// CHECK-NEXT: moert.uniform_segments {{.+}} groups = 1 : i64, ranks = 2 : i64
// CHECK-NEXT: moert.grouped_gemm {{.+}}bias = {{.+}} : memref<1x6xf32>
// CHECK-NEXT: moert.grouped_gemm {{.+}}bias = {{.+}} : memref<1x8xf32>{{.+}} {bias_scale = 5.000000e-01 : f64}
// CHECK-NEXT: moert.all_to_all
// CHECK-NEXT: moert.combine ins({{.+}}indices = %[[VI]]{{.+}}gates = %[[VG]]
// CHECK: } backward {
// CHECK-NEXT: moert.combine_backward {{.+}} outs({{.+}}, grad_gates = %[[VGG:[^ ]+]] : memref<12x2xf32>)
// CHECK-NEXT: moert.shard_routing_backward ins(grad_gates = %[[VGG]] : memref<12x2xf32>) outs(grad_gates = %[[GG:[^ ]+]] : memref<12x1xf32>) {shards = 2 : i64}
// CHECK: moert.dispatch_backward ins({{.+}}indices = %[[VI]]
// CHECK-NEXT: moert.gate_backward ins(grad_gates = %[[GG]]

// r = 0: every shard gathered (2 virtual experts), the same routing; the
// gradients are reduce-scattered back to the shards.
// CHECK: moert.variant "r0d1" forward {
// CHECK: moert.shard_routing
// CHECK: moert.all_gather ins(input = {{.+}} : memref<1x8x6xf32>) outs(output = {{.+}} : memref<2x8x6xf32>)
// CHECK: moert.grouped_gemm {{.+}}bias = {{.+}} : memref<2x8xf32>{{.+}} {bias_scale = 5.000000e-01 : f64}
// CHECK: } backward {
// CHECK: moert.shard_routing_backward
// CHECK: moert.reduce_scatter ins(input = {{.+}} : memref<2x8xf32>) outs(output = {{.+}} : memref<1x8xf32>)

func.func @layer(%x: tensor<12x8xf32>, %wg: tensor<8x1xf32>, %w1: tensor<1x8x12xf32>, %w2: tensor<1x12x8xf32>, %b1: tensor<1x12xf32>, %b2: tensor<1x8xf32>) -> (tensor<12x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2 bias(%b1, %b2) {top_k = 1, capacity = #moe.capacity<fixed 1.0>} : (tensor<12x8xf32>, tensor<8x1xf32>, tensor<1x8x12xf32>, tensor<1x12x8xf32>, tensor<1x12xf32>, tensor<1x8xf32>) -> (tensor<12x8xf32>, tensor<f32>)
  return %out, %aux : tensor<12x8xf32>, tensor<f32>
}
