// RUN: moe-opt %s --moe-lower-to-plan="fuse-combine=true" | FileCheck %s
// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-combine=true fuse-activation-backward=true" | FileCheck %s --check-prefix=BOTH
// RUN: moe-opt %s --moe-lower-to-plan | FileCheck %s --check-prefix=DEFAULT

// --moe-lower-to-plan="fuse-combine=true" runs --moert-fuse-combine after
// the dispatch and glu fusions (a `+gather` copy's row_tokens serves the
// combine) and before the backward fusion and the memory plan: every
// variant gets a combine-fused copy, after every variant the plan had, and
// every buffer is placed. Off by default until the fused store has run on
// a GPU.

// CHECK-LABEL: moert.plan @gelu_bf16
// CHECK-SAME: workspace_bytes =
// CHECK: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.alloc "single+combine.{{[a-z_]+}}" {offset = {{[0-9]+}} : i64}
// CHECK: moert.variant "single+combine" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_combine
// CHECK: moert.variant "single+gather+combine" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.grouped_gemm_combine ins({{.+}}row_tokens =
// CHECK-NOT: moert.variant

// Training with both: the combine-fused copies, then a backward-fused copy
// of each of the four.
// BOTH-LABEL: moert.plan @gelu_bf16
// BOTH: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// BOTH: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// BOTH: moert.variant "single+combine" workspace_bytes = {{[0-9]+}} forward {
// BOTH: moert.variant "single+gather+combine" workspace_bytes = {{[0-9]+}} forward {
// BOTH: moert.variant "single+act_backward" workspace_bytes = {{[0-9]+}} forward {
// BOTH: moert.variant "single+gather+act_backward" workspace_bytes = {{[0-9]+}} forward {
// BOTH: moert.variant "single+combine+act_backward" workspace_bytes = {{[0-9]+}} forward {
// BOTH: moert.grouped_gemm_combine
// BOTH: moert.grouped_gemm_activation_backward
// BOTH: moert.variant "single+gather+combine+act_backward" workspace_bytes = {{[0-9]+}} forward {
// BOTH-NOT: moert.variant

// DEFAULT-LABEL: moert.plan @gelu_bf16
// DEFAULT: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT-NOT: moert.variant
// DEFAULT-NOT: grouped_gemm_combine

func.func @gelu_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                     %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}
