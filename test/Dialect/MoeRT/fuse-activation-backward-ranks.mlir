// RUN: moe-opt %s --moe-multiversion="ranks=2 variants=r1d2,r0d1" --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true layouts=padded" | moe-opt --pass-pipeline='builtin.module(moert.plan(moert-fuse-activation-backward))' | FileCheck %s

// --moert-fuse-activation-backward on two ranks: the fused step is per
// expert, local to a rank, so the exchanges stay as they are. Pipelined
// (d = 2) the two chunks share grad_hidden, each in its own rows: both
// pairs are fused, and the copy has no grad_hidden. With the experts
// gathered (r = 0), b is the gathered w2.

// CHECK-LABEL: moert.plan @gelu_two_ranks
// CHECK-SAME: world_size = 2
// CHECK: moert.variant "r1d2.padded" forward {
// CHECK: moert.variant "r0d1.padded" forward {
// CHECK-NOT: "r1d2.padded+act_backward.grad_hidden"
// CHECK: %[[OFFSETS0:.+]] = moert.alloc "r1d2.padded+act_backward.segment_offsets.0"
// CHECK: %[[OFFSETS1:.+]] = moert.alloc "r1d2.padded+act_backward.segment_offsets.1"
// CHECK-NOT: "r1d2.padded+act_backward.grad_hidden"
// CHECK: %[[GHP:.+]] = moert.alloc "r1d2.padded+act_backward.grad_hidden_pre" : memref<32x24xbf16>
// CHECK: moert.variant "r1d2.padded+act_backward" forward {
// CHECK: } backward {
// CHECK-NOT: moert.activation_backward
// CHECK: moert.grouped_gemm_activation_backward ins({{.+}}, expert_offsets = %[[OFFSETS0]] : {{.+}}) outs(c = %[[GHP]] : memref<32x24xbf16>) {activation = #moe<activation gelu>, trans_b}
// CHECK-NOT: moert.activation_backward
// CHECK: moert.grouped_gemm_activation_backward ins({{.+}}, expert_offsets = %[[OFFSETS1]] : {{.+}}) outs(c = %[[GHP]] : memref<32x24xbf16>) {activation = #moe<activation gelu>, trans_b}
// CHECK-NOT: moert.activation_backward
// CHECK: %[[FULL_W2:.+]] = moert.alloc "r0d1.padded+act_backward.full_w2" : memref<4x24x16xbf16>
// CHECK: moert.variant "r0d1.padded+act_backward" forward {
// CHECK: } backward {
// CHECK: moert.grouped_gemm_activation_backward ins(a = %{{[^ ]+}} : memref<32x16xbf16>, b = %[[FULL_W2]] : memref<4x24x16xbf16>,
// CHECK-NOT: moert.activation_backward
// CHECK-NOT: moert.variant

func.func @gelu_two_ranks(%x: tensor<12x16xbf16>, %wg: tensor<16x4xf32>,
                          %w1: tensor<4x16x24xbf16>, %w2: tensor<4x24x16xbf16>)
    -> (tensor<12x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.5>}
      : (tensor<12x16xbf16>, tensor<16x4xf32>, tensor<4x16x24xbf16>,
         tensor<4x24x16xbf16>) -> (tensor<12x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<12x16xbf16>, tensor<f32>
}
