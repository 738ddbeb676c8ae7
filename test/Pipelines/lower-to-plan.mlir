// RUN: moe-opt %s --moe-lower-to-plan | FileCheck %s
// RUN: moe-opt %s --moe-lower-to-plan="training=true layout=padded" | FileCheck %s --check-prefix=TRAIN

// The whole pipeline: moe.layer -> expanded -> canonicalized (bounded with a
// bound >= T becomes dropless) -> moert.plan with a placed workspace.

// CHECK-LABEL: moert.plan @layer
// CHECK-SAME: capacity = #moe.capacity<dropless>,
// CHECK-SAME: workspace_bytes =
// CHECK: moert.alloc "logits" {offset = {{[0-9]+}} : i64}
// CHECK: moert.gate {{.+}}capacity = #moe.capacity<dropless>{{.+}}layout = #moert<layout ragged>
// CHECK-NOT: func.func

// TRAIN-LABEL: moert.plan @layer
// TRAIN-SAME: training
// TRAIN: moert.alloc "dispatched" {offset = {{[0-9]+}} : i64} : memref<32x8xf32>
// TRAIN: layout = #moert<layout padded>
// TRAIN: } backward {
// TRAIN-NEXT: moert.combine_backward

func.func @layer(%x: tensor<8x8xf32>, %wg: tensor<8x4xf32>,
                 %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>)
    -> (tensor<8x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 1, capacity = #moe.capacity<bounded 8.0>}
      : (tensor<8x8xf32>, tensor<8x4xf32>, tensor<4x8x16xf32>, tensor<4x16x8xf32>)
      -> (tensor<8x8xf32>, tensor<f32>)
  return %out, %aux : tensor<8x8xf32>, tensor<f32>
}
