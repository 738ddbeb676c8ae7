// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-dispatch=false fuse-activation-backward=true" | moe-translate --moert-to-plan | FileCheck %s

// The plan file of a backward-fused variant: grouped_gemm_activation_backward
// with its roles and attributes as the runtime's writer names them, no
// buffer for the gradient before the activation in the copy; the runtime's
// verifier accepted the plan. The original variant stays first, the plan's
// default.

// CHECK: "workspace": {
// CHECK-NOT: "single+act_backward.grad_hidden"
// CHECK: "variants": [
// CHECK: "name": "single",
// CHECK: "op": "activation_backward",
// CHECK: "name": "single+act_backward",
// CHECK-NOT: "op": "activation_backward",
// CHECK: "op": "grouped_gemm_activation_backward",
// CHECK-NEXT: "in": {
// CHECK-NEXT: "expert_offsets": "single+act_backward.expert_offsets",
// CHECK-NEXT: "expert_rows": "single+act_backward.expert_rows",
// CHECK-NEXT: "a": "single+act_backward.grad_expert_out",
// CHECK-NEXT: "b": "w2",
// CHECK-NEXT: "pre": "single+act_backward.hidden_pre"
// CHECK-NEXT: },
// CHECK-NEXT: "out": {
// CHECK-NEXT: "c": "single+act_backward.grad_hidden_pre"
// CHECK-NEXT: },
// CHECK-NEXT: "attrs": {
// CHECK-NEXT: "trans_b": true,
// CHECK-NEXT: "activation": "gelu"
// CHECK-NEXT: },
// CHECK-NOT: "op": "activation_backward",
// CHECK: "default_variant": 0

func.func @gelu_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                     %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}
