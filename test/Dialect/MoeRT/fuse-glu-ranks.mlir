// RUN: moe-opt %s --moe-multiversion="ranks=2 variants=r1d2,r0d1" --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true layouts=padded" | moe-opt --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu))' | FileCheck %s
// RUN: moe-opt %s --moe-multiversion="ranks=2 variants=r1d2,r0d1" --moe-expand-layer --canonicalize --convert-moe-to-moert="layouts=padded" | moe-opt --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 | FileCheck %s --check-prefix=INFER

// --moert-fuse-glu on two ranks: the fused step is per expert, local to a
// rank, so the exchanges stay as they are. Pipelined (d = 2) each chunk's
// glu is fused, the chunks sharing gate_in / up_in as in the original;
// with the experts gathered (r = 0), b and b_up are the gathered weights.

// CHECK-LABEL: moert.plan @gated_two_ranks
// CHECK-SAME: world_size = 2
// CHECK: moert.variant "r1d2.padded" forward {
// CHECK: moert.variant "r0d1.padded" forward {
// CHECK: %[[RECEIVED:.+]] = moert.alloc "r1d2.padded+glu.received" : memref<128x8xbf16>
// CHECK: %[[OFFSETS0:.+]] = moert.alloc "r1d2.padded+glu.segment_offsets.0"
// CHECK: %[[H:.+]] = moert.alloc "r1d2.padded+glu.hidden" : memref<128x16xbf16>
// CHECK-NEXT: %[[GATE:.+]] = moert.alloc "r1d2.padded+glu.gate_proj" : memref<128x16xbf16>
// CHECK-NEXT: %[[UP:.+]] = moert.alloc "r1d2.padded+glu.up_proj" : memref<128x16xbf16>
// CHECK-NEXT: %[[OFFSETS1:.+]] = moert.alloc "r1d2.padded+glu.segment_offsets.1"
// CHECK: moert.variant "r1d2.padded+glu" forward {
// CHECK-NOT: moert.glu
// CHECK: moert.all_to_all
// CHECK: moert.grouped_gemm_glu ins(a = %[[RECEIVED]] : memref<128x8xbf16>, b = %{{[^ ]+}} : memref<2x8x16xbf16>, b_up = %{{[^ ]+}} : memref<2x8x16xbf16>, expert_offsets = %[[OFFSETS0]] : {{.+}}) outs(c = %[[H]] : memref<128x16xbf16>, gate_in = %[[GATE]] : memref<128x16xbf16>, up_in = %[[UP]] : memref<128x16xbf16>)
// CHECK-NOT: moert.glu
// CHECK: moert.grouped_gemm_glu ins(a = %[[RECEIVED]] : memref<128x8xbf16>, {{.+}}, expert_offsets = %[[OFFSETS1]] : {{.+}}) outs(c = %[[H]] : memref<128x16xbf16>, gate_in = %[[GATE]] : memref<128x16xbf16>, up_in = %[[UP]] : memref<128x16xbf16>)
// CHECK-NOT: moert.glu
// CHECK: } backward {
// CHECK: moert.glu_backward ins(gate_in = %[[GATE]] : memref<128x16xbf16>, up_in = %[[UP]] : memref<128x16xbf16>, {{.+}}, expert_offsets = %[[OFFSETS0]]
// CHECK: moert.glu_backward ins(gate_in = %[[GATE]] : memref<128x16xbf16>, up_in = %[[UP]] : memref<128x16xbf16>, {{.+}}, expert_offsets = %[[OFFSETS1]]
// CHECK: %[[FULL_W1:.+]] = moert.alloc "r0d1.padded+glu.full_w1" : memref<4x8x16xbf16>
// CHECK: %[[FULL_W3:.+]] = moert.alloc "r0d1.padded+glu.full_w3" : memref<4x8x16xbf16>
// CHECK: moert.variant "r0d1.padded+glu" forward {
// CHECK: moert.all_gather {{.+}} outs(output = %[[FULL_W1]] :
// CHECK: moert.all_gather {{.+}} outs(output = %[[FULL_W3]] :
// CHECK: moert.grouped_gemm_glu ins(a = %{{[^ ]+}} : memref<128x8xbf16>, b = %[[FULL_W1]] : memref<4x8x16xbf16>, b_up = %[[FULL_W3]] : memref<4x8x16xbf16>, {{.+}}) outs(c = %{{[^ ]+}} : memref<128x16xbf16>, gate_in = %{{[^ ]+}} : memref<128x16xbf16>, up_in = %{{[^ ]+}} : memref<128x16xbf16>)
// CHECK: } backward {
// CHECK: moert.glu_backward
// CHECK-NOT: moert.variant

// Inference: neither chunk writes gate_in / up_in, which have no buffers.
// INFER: remark: variant 'r1d2.padded' fused as 'r1d2.padded+glu': 2 grouped_gemm_glu steps, gate_in and up_in not written
// INFER: remark: variant 'r0d1.padded' fused as 'r0d1.padded+glu': 1 grouped_gemm_glu step, gate_in and up_in not written
// INFER-LABEL: moert.plan @gated_two_ranks
// INFER-NOT: "r1d2.padded+glu.gate_proj"
// INFER-NOT: "r1d2.padded+glu.up_proj"
// INFER: moert.variant "r1d2.padded+glu" forward {
// INFER: moert.grouped_gemm_glu ins({{.+}}) outs(c = %{{[^ ]+}} : memref<128x16xbf16>){{$}}
// INFER: moert.grouped_gemm_glu ins({{.+}}) outs(c = %{{[^ ]+}} : memref<128x16xbf16>){{$}}
// INFER-NOT: "r0d1.padded+glu.gate_proj"
// INFER-NOT: "r0d1.padded+glu.up_proj"
// INFER: moert.variant "r0d1.padded+glu" forward {
// INFER: moert.grouped_gemm_glu ins({{.+}}) outs(c = %{{[^ ]+}} : memref<128x16xbf16>){{$}}

func.func @gated_two_ranks(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                           %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
                           %w3: tensor<4x8x16xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<fixed 2.0>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>, tensor<4x8x16xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}
