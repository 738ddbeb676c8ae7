// RUN: moe-opt %s --moe-lower-to-plan="training=true fuse-dispatch=true" | moe-translate --moert-to-plan | FileCheck %s

// The plan file of a gather-fused variant: the i32 row_tokens workspace
// buffer, the dispatch_rows step writing it, and fc1's grouped_gemm and
// grouped_gemm_wgrad reading the argument x through it (the runtime's writer
// names the roles; its verifier accepted the plan). The original variant
// stays first, the plan's default.

// CHECK: "workspace": {
// CHECK: "name": "single+gather.row_tokens",
// CHECK-NEXT: "dtype": "i32",
// CHECK-NEXT: "shape": [
// CHECK-NEXT: 128
// CHECK-NEXT: ],
// CHECK-NEXT: "offset":
// CHECK: "variants": [
// CHECK: "name": "single",
// CHECK-NOT: row_tokens
// CHECK: "op": "dispatch",
// CHECK-NOT: row_tokens
// CHECK: "name": "single+gather",
// CHECK: "forward": [
// CHECK: "op": "gate",
// CHECK: "op": "dispatch_rows",
// CHECK-NEXT: "in": {
// CHECK-NEXT: "indices": "single+gather.indices",
// CHECK-NEXT: "locations": "single+gather.locations",
// CHECK-NEXT: "capacity": "single+gather.capacity",
// CHECK-NEXT: "expert_offsets": "single+gather.expert_offsets"
// CHECK-NEXT: },
// CHECK-NEXT: "out": {
// CHECK-NEXT: "row_tokens": "single+gather.row_tokens"
// CHECK-NEXT: },
// CHECK-NEXT: "attrs": {},
// CHECK: "op": "grouped_gemm",
// CHECK-NEXT: "in": {
// CHECK-NEXT: "expert_offsets": "single+gather.expert_offsets",
// CHECK-NEXT: "expert_rows": "single+gather.expert_rows",
// CHECK-NEXT: "row_tokens": "single+gather.row_tokens",
// CHECK-NEXT: "a": "x",
// CHECK-NEXT: "b": "w1"
// CHECK-NEXT: },
// CHECK-NEXT: "out": {
// CHECK-NEXT: "c": "single+gather.hidden",
// CHECK-NEXT: "pre": "single+gather.hidden_pre"
// CHECK: "op": "grouped_gemm",
// CHECK-NOT: "row_tokens"
// CHECK: "backward": [
// CHECK: "op": "activation_backward",
// CHECK: "op": "grouped_gemm_wgrad",
// CHECK-NEXT: "in": {
// CHECK-NEXT: "expert_offsets": "single+gather.expert_offsets",
// CHECK-NEXT: "expert_rows": "single+gather.expert_rows",
// CHECK-NEXT: "row_tokens": "single+gather.row_tokens",
// CHECK-NEXT: "a": "x",
// CHECK-NEXT: "grad_c": "single+gather.grad_hidden_pre"
// CHECK-NEXT: },
// CHECK-NEXT: "out": {
// CHECK-NEXT: "grad_b": "grad_w1"
// CHECK: "default_variant": 0

// GELU: its backward reads `pre`, which the copy writes too (a ReLU's
// reads its output and keeps none).
func.func @ragged_bf16(%x: tensor<64x16xbf16>, %wg: tensor<16x4xbf16>,
                       %w1: tensor<4x16x32xbf16>, %w2: tensor<4x32x16xbf16>)
    -> (tensor<64x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x16xbf16>, tensor<16x4xbf16>, tensor<4x16x32xbf16>,
         tensor<4x32x16xbf16>) -> (tensor<64x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x16xbf16>, tensor<f32>
}
