// RUN: moe-opt %s --moe-lower-to-plan="fuse-glu=true" | moe-translate --moert-to-plan | FileCheck %s --check-prefix=INFER
// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-glu=true" | moe-translate --moert-to-plan | FileCheck %s

// The plan file of glu-fused variants: grouped_gemm_glu with its roles as
// the runtime's writer names them (b_up the up projection's weight), reading
// x through row_tokens in the copy of the gather-fused variant, and writing
// gate_in / up_in only in a training plan, where glu_backward reads them;
// the runtime's verifier accepted the plan. The original variants stay
// first, the plan's default.

// INFER: "workspace": {
// INFER-NOT: "single+glu.gate_proj"
// INFER-NOT: "single+glu.up_proj"
// INFER: "name": "single+glu.hidden",
// INFER-NOT: "single+gather+glu.gate_proj"
// INFER-NOT: "single+gather+glu.up_proj"
// INFER: "variants": [
// INFER: "name": "single",
// INFER: "op": "glu",
// INFER: "name": "single+gather",
// INFER: "op": "glu",
// INFER: "name": "single+glu",
// INFER-NOT: "op": "glu",
// INFER: "op": "grouped_gemm_glu",
// INFER-NEXT: "in": {
// INFER-NEXT: "expert_offsets": "single+glu.expert_offsets",
// INFER-NEXT: "expert_rows": "single+glu.expert_rows",
// INFER-NEXT: "a": "single+glu.dispatched",
// INFER-NEXT: "b": "w1",
// INFER-NEXT: "b_up": "w3"
// INFER-NEXT: },
// INFER-NEXT: "out": {
// INFER-NEXT: "c": "single+glu.hidden"
// INFER-NEXT: },
// INFER-NEXT: "attrs": {},
// INFER-NOT: "op": "glu",
// INFER: "name": "single+gather+glu",
// INFER-NOT: "op": "glu",
// INFER: "op": "grouped_gemm_glu",
// INFER-NEXT: "in": {
// INFER-NEXT: "expert_offsets": "single+gather+glu.expert_offsets",
// INFER-NEXT: "expert_rows": "single+gather+glu.expert_rows",
// INFER-NEXT: "row_tokens": "single+gather+glu.row_tokens",
// INFER-NEXT: "a": "x",
// INFER-NEXT: "b": "w1",
// INFER-NEXT: "b_up": "w3"
// INFER-NEXT: },
// INFER-NEXT: "out": {
// INFER-NEXT: "c": "single+gather+glu.hidden"
// INFER-NEXT: },
// INFER-NOT: "op": "glu",
// INFER: "default_variant": 0

// CHECK: "variants": [
// CHECK: "name": "single+glu",
// CHECK: "op": "grouped_gemm_glu",
// CHECK-NEXT: "in": {
// CHECK-NEXT: "expert_offsets": "single+glu.expert_offsets",
// CHECK-NEXT: "expert_rows": "single+glu.expert_rows",
// CHECK-NEXT: "a": "single+glu.dispatched",
// CHECK-NEXT: "b": "w1",
// CHECK-NEXT: "b_up": "w3"
// CHECK-NEXT: },
// CHECK-NEXT: "out": {
// CHECK-NEXT: "c": "single+glu.hidden",
// CHECK-NEXT: "gate_in": "single+glu.gate_proj",
// CHECK-NEXT: "up_in": "single+glu.up_proj"
// CHECK-NEXT: },
// CHECK: "backward": [
// CHECK: "op": "glu_backward",
// CHECK-NEXT: "in": {
// CHECK-NEXT: "expert_offsets": "single+glu.expert_offsets",
// CHECK-NEXT: "expert_rows": "single+glu.expert_rows",
// CHECK-NEXT: "gate_in": "single+glu.gate_proj",
// CHECK-NEXT: "up_in": "single+glu.up_proj",
// CHECK: "name": "single+gather+glu",
// CHECK: "op": "grouped_gemm_glu",
// CHECK: "out": {
// CHECK-NEXT: "c": "single+gather+glu.hidden",
// CHECK-NEXT: "gate_in": "single+gather+glu.gate_proj",
// CHECK-NEXT: "up_in": "single+gather+glu.up_proj"
// CHECK: "default_variant": 0

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
