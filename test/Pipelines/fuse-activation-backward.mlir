// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-activation-backward=true" | FileCheck %s
// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-glu=false fuse-activation-backward=true" | FileCheck %s --check-prefix=NOGLU
// RUN: moe-opt %s --moe-lower-to-plan="training=true" | FileCheck %s --check-prefix=DEFAULT

// --moe-lower-to-plan="fuse-activation-backward=true" runs
// --moert-fuse-activation-backward after the other fusions and before the
// memory plan: every variant they made gets a backward-fused copy, after
// every variant the plan had, and every buffer is placed. Off by default
// until the fused step has run on a GPU.

// CHECK-LABEL: moert.plan @gelu_bf16
// CHECK-SAME: workspace_bytes =
// CHECK: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.alloc "single+act_backward.{{[a-z_]+}}" {offset = {{[0-9]+}} : i64}
// CHECK: moert.variant "single+act_backward" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_activation_backward
// CHECK: moert.variant "single+gather+act_backward" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_activation_backward
// CHECK-NOT: moert.variant

// Gated: the glu-fused copies of the plain and gathered variants, then a
// backward-fused copy of each of the four (glu_backward with its GEMM).
// CHECK-LABEL: moert.plan @gated_bf16
// CHECK: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.variant "single+glu" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.variant "single+gather+glu" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.variant "single+act_backward" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_glu_backward
// CHECK: moert.variant "single+gather+act_backward" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_glu_backward
// CHECK: moert.variant "single+glu+act_backward" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_glu_backward
// CHECK: moert.variant "single+gather+glu+act_backward" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_glu_backward
// CHECK-NOT: moert.variant

// NOGLU-LABEL: moert.plan @gelu_bf16
// NOGLU: moert.variant "single+act_backward" workspace_bytes = {{[0-9]+}} forward {
// NOGLU: moert.variant "single+gather+act_backward" workspace_bytes = {{[0-9]+}} forward {
// NOGLU-LABEL: moert.plan @gated_bf16
// NOGLU: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// NOGLU: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// NOGLU: moert.variant "single+act_backward" workspace_bytes = {{[0-9]+}} forward {
// NOGLU: moert.variant "single+gather+act_backward" workspace_bytes = {{[0-9]+}} forward {
// NOGLU-NOT: moert.variant

// DEFAULT-LABEL: moert.plan @gelu_bf16
// DEFAULT: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT-NOT: moert.variant
// DEFAULT-NOT: grouped_gemm_activation_backward
// DEFAULT-LABEL: moert.plan @gated_bf16

func.func @gelu_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                     %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}

func.func @gated_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                      %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
                      %w3: tensor<4x8x16xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>, tensor<4x8x16xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}
