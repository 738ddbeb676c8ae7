// RUN: moe-opt %s --moe-multiversion="ranks=2 variants=r1d1,r1d2,r0d1" | FileCheck %s

// Three variants of one layer, one function each, with one parameter layout
// (the same [2, ...] weight arguments) and one capacity: aligned to every
// degree (lcm(1, 2, 1) = 2), so C = 2 * int(1.0 * ceil(15 / 4)) = 8 for all.

// CHECK-LABEL: func.func @layer__r1d1
// CHECK-SAME: tensor<2x8x12xf32>, %{{.+}}: tensor<2x12x8xf32>
// CHECK-SAME: attributes {moe.variant = "r1d1", moe.variant_of = "layer"}
// CHECK: moe.gate {{.+}}capacity = #moe.capacity<fixed 1.0, align = 2>{{.+}}capacity = 8>
// CHECK: moe.all_to_all dispatch {{.+}} -> tensor<2x16x8xf32>
// CHECK-LABEL: func.func @layer__r1d2
// CHECK-SAME: attributes {moe.variant = "r1d2", moe.variant_of = "layer"}
// CHECK: moe.all_to_all dispatch {{.+}} -> tensor<2x8x8xf32>, tensor<2x8x8xf32>
// CHECK-LABEL: func.func @layer__r0d1
// CHECK-SAME: tensor<2x8x12xf32>, %{{.+}}: tensor<2x12x8xf32>
// CHECK: moe.all_gather
// CHECK-NOT: func.func @layer(

func.func @layer(%x: tensor<15x8xf32>, %wg: tensor<8x4xf32>,
                 %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>)
    -> (tensor<15x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>}
      : (tensor<15x8xf32>, tensor<8x4xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>)
      -> (tensor<15x8xf32>, tensor<f32>)
  return %out, %aux : tensor<15x8xf32>, tensor<f32>
}
