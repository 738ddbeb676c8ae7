// RUN: moe-opt %s --moe-multiversion="ranks=2 variants=r1d1,r1d2,r0d1" --convert-moe-to-moert="training=true" | FileCheck %s

// Three variants become one plan on 2 ranks with one set of arguments (each
// rank's [E/W, ...] slice of the experts) and one moert.variant each, their
// buffers prefixed by the variant's name. Multi-rank plans are padded.

// CHECK-LABEL: moert.plan @layer
// CHECK-SAME: training
// CHECK-SAME: world_size = 2
// CHECK: moert.argument "w1" input : memref<2x8x12xf32>
// CHECK: moert.argument "grad_w1" grad_output : memref<2x8x12xf32>

// r = 1, D = 1: exchange, uniform segments of the received rows, experts,
// exchange back; the backward mirrors it.
// CHECK: moert.variant "r1d1" forward {
// CHECK: moert.gate {{.+}}layout = #moert<layout padded>
// CHECK-NOT: moert.sync_capacity
// CHECK: moert.dispatch
// CHECK-NEXT: moert.all_to_all ins(input = {{.+}}) outs(output = %[[RECV:.+]] : memref<32x8xf32>) {chunk = 0 : i64, chunks = 1 : i64, direction = #moert<direction dispatch>, group_size = 0 : i64, group_stride = 1 : i64, ranks_per_node = 0 : i64}
// CHECK-NEXT: moert.uniform_segments {{.+}} {chunk = 0 : i64, chunks = 1 : i64, groups = 2 : i64, ranks = 2 : i64}
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[RECV]]
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.all_to_all {{.+}} direction = #moert<direction combine>
// CHECK-NEXT: moert.combine
// CHECK: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.all_to_all {{.+}} direction = #moert<direction dispatch>
// CHECK: moert.all_to_all {{.+}} direction = #moert<direction combine>
// CHECK-NEXT: moert.dispatch_backward

// r = 1, D = 2: two chunks; the second chunk's weight gradients add up.
// Both chunks are sent before the experts run (chunk 1 arrives while
// chunk 0's experts run), then each chunk's experts and its way back.
// CHECK: moert.variant "r1d2" forward {
// CHECK: moert.dispatch
// CHECK-NEXT: moert.all_to_all {{.+}} {chunk = 0 : i64, chunks = 2 : i64, direction = #moert<direction dispatch>, group_size = 0 : i64, group_stride = 1 : i64, ranks_per_node = 0 : i64}
// CHECK-NEXT: moert.all_to_all {{.+}} {chunk = 1 : i64, chunks = 2 : i64, direction = #moert<direction dispatch>, group_size = 0 : i64, group_stride = 1 : i64, ranks_per_node = 0 : i64}
// CHECK-NEXT: moert.uniform_segments {{.+}} {chunk = 0 : i64, chunks = 2 : i64
// CHECK: moert.all_to_all {{.+}} {chunk = 0 : i64, chunks = 2 : i64, direction = #moert<direction combine>
// CHECK-NEXT: moert.uniform_segments {{.+}} {chunk = 1 : i64, chunks = 2 : i64
// CHECK: moert.all_to_all {{.+}} {chunk = 1 : i64, chunks = 2 : i64, direction = #moert<direction combine>
// CHECK-NEXT: moert.combine
// CHECK: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.all_to_all {{.+}} {chunk = 0 : i64, chunks = 2 : i64, direction = #moert<direction dispatch>
// CHECK-NEXT: moert.all_to_all {{.+}} {chunk = 1 : i64, chunks = 2 : i64, direction = #moert<direction dispatch>
// CHECK: moert.all_to_all {{.+}} {chunk = 0 : i64, chunks = 2 : i64, direction = #moert<direction combine>
// CHECK: moert.grouped_gemm_wgrad {{.+}}outs(grad_b = {{.+}}) {accumulate}
// CHECK: moert.all_to_all {{.+}} {chunk = 1 : i64, chunks = 2 : i64, direction = #moert<direction combine>
// CHECK-NEXT: moert.dispatch_backward

// r = 0: gather the experts, run them all, reduce-scatter their gradients.
// CHECK: moert.variant "r0d1" forward {
// CHECK: moert.all_gather ins(input = %{{.+}} : memref<2x8x12xf32>) outs(output = %{{.+}} : memref<4x8x12xf32>)
// CHECK: } backward {
// CHECK: moert.reduce_scatter ins(input = %{{.+}} : memref<4x8x12xf32>) outs(output = %{{.+}} : memref<2x8x12xf32>)
// CHECK-NOT: func.func

func.func @layer(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>,
                 %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>)
    -> (tensor<16x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>}
      : (tensor<16x8xf32>, tensor<8x4xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>)
      -> (tensor<16x8xf32>, tensor<f32>)
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
