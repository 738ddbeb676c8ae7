// RUN: moe-opt %s --moe-lower-to-plan="training=true" | moe-translate --moert-to-plan | FileCheck %s

// The plan file of a small training plan: format and version, the layer, the
// arguments with their roles, placed workspace buffers, and the steps with
// operands named by role.

// CHECK: "format": "flex-plan"
// CHECK: "version": 2
// CHECK: "layer": {
// CHECK: "tokens": 10
// CHECK: "capacity_mode": "bounded"
// CHECK: "capacity_factor": 1.5
// CHECK: "training": true
// CHECK: "arguments": [
// CHECK: "name": "x"
// CHECK: "role": "input"
// CHECK: "workspace": {
// CHECK: "alignment": 256
// CHECK: "name": "logits"
// CHECK: "offset":
// CHECK: "variants": [
// CHECK: "name": "single"
// CHECK: "op": "router"
// CHECK: "op": "gate"
// CHECK: "layout": "ragged"
// CHECK: "op": "grouped_gemm"
// CHECK: "epilogue": "silu"
// CHECK: "backward": [
// CHECK: "op": "combine_backward"
// CHECK: "op": "router_backward"

func.func @bounded(%x: tensor<10x8xf32>, %wg: tensor<8x4xf32>,
                   %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>)
    -> (tensor<10x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<silu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<bounded 1.5>}
      : (tensor<10x8xf32>, tensor<8x4xf32>, tensor<4x8x16xf32>, tensor<4x16x8xf32>)
      -> (tensor<10x8xf32>, tensor<f32>)
  return %out, %aux : tensor<10x8xf32>, tensor<f32>
}
