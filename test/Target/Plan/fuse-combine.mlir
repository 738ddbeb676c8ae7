// RUN: moe-opt %s --moe-lower-to-plan="fuse-combine=true" | moe-translate --moert-to-plan | FileCheck %s

// The plan file of a combine-fused variant: grouped_gemm_combine with its
// roles and attributes as the runtime's writer names them (row_tokens from
// the gather-fused copy's dispatch_rows); the runtime's verifier accepted
// the plan. The original variants stay first, the plan's default.

// CHECK: "variants": [
// CHECK: "name": "single",
// CHECK: "op": "combine",
// CHECK: "name": "single+gather+combine",
// CHECK-NOT: "op": "combine",
// CHECK: "op": "grouped_gemm_combine",
// CHECK-NEXT: "in": {
// CHECK-NEXT: "indices": "single+gather+combine.indices",
// CHECK-NEXT: "locations": "single+gather+combine.locations",
// CHECK-NEXT: "gates": "single+gather+combine.gates",
// CHECK-NEXT: "capacity": "single+gather+combine.capacity",
// CHECK-NEXT: "expert_offsets": "single+gather+combine.expert_offsets",
// CHECK-NEXT: "expert_rows": "single+gather+combine.expert_rows",
// CHECK-NEXT: "row_tokens": "single+gather+combine.row_tokens",
// CHECK-NEXT: "a": "single+gather+combine.hidden",
// CHECK-NEXT: "b": "w2",
// CHECK-NEXT: "bias": "b2"
// CHECK-NEXT: },
// CHECK-NEXT: "out": {
// CHECK-NEXT: "c": "single+gather+combine.expert_out",
// CHECK-NEXT: "out": "out"
// CHECK-NEXT: },
// CHECK-NEXT: "attrs": {
// CHECK-NEXT: "trans_b": false,
// CHECK-NEXT: "epilogue": "none",
// CHECK-NEXT: "bias_scale": 1.0
// CHECK-NEXT: },
// CHECK: "default_variant": 0

func.func @relu_bias_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                          %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
                          %b1: tensor<4x16xbf16>, %b2: tensor<4x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>, tensor<4x16xbf16>, tensor<4x8xbf16>)
      -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}
