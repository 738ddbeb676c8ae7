// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-glu=true" | FileCheck %s
// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-dispatch=false fuse-glu=true" | FileCheck %s --check-prefix=NOGATHER
// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-glu=false" | FileCheck %s --check-prefix=OFF
// RUN: moe-opt %s --moe-lower-to-plan="training=true" | FileCheck %s --check-prefix=DEFAULT

// --moe-lower-to-plan="fuse-glu=true" runs --moert-fuse-glu after
// --moert-fuse-dispatch and before the memory plan: both the plain variant
// and its gather-fused copy get a glu-fused copy, after every variant the
// plan had (so their indices stay), and every buffer, the copies' included,
// is placed. The default is on; fuse-glu=false leaves them out.

// CHECK-LABEL: moert.plan @gated_bf16
// CHECK-SAME: workspace_bytes =
// CHECK: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.glu ins
// CHECK: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.glu ins
// CHECK: moert.alloc "single+glu.gate_proj" {offset = {{[0-9]+}} : i64} : memref<64x16xbf16>
// CHECK: moert.variant "single+glu" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NOT: moert.glu ins
// CHECK: moert.grouped_gemm_glu
// CHECK-NOT: moert.glu ins
// CHECK: moert.alloc "single+gather+glu.row_tokens" {offset = {{[0-9]+}} : i64} : memref<64xi32>
// CHECK-NEXT: moert.variant "single+gather+glu" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NOT: moert.glu ins
// CHECK: moert.grouped_gemm_glu ins(a = %{{[^ ]+}} : memref<32x8xbf16>, {{.+}}, row_tokens =
// CHECK-NOT: moert.glu ins
// CHECK: moert.glu_backward
// CHECK-NOT: moert.variant

// NOGATHER-LABEL: moert.plan @gated_bf16
// NOGATHER: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// NOGATHER: moert.variant "single+glu" workspace_bytes = {{[0-9]+}} forward {
// NOGATHER-NOT: moert.variant

// OFF-LABEL: moert.plan @gated_bf16
// OFF: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// OFF: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// OFF-NOT: moert.variant
// OFF-NOT: grouped_gemm_glu

// DEFAULT-LABEL: moert.plan @gated_bf16
// DEFAULT: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT: moert.variant "single+gather" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT: moert.variant "single+glu" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT: moert.grouped_gemm_glu
// DEFAULT: moert.variant "single+gather+glu" workspace_bytes = {{[0-9]+}} forward {
// DEFAULT: moert.grouped_gemm_glu
// DEFAULT-NOT: moert.variant

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
