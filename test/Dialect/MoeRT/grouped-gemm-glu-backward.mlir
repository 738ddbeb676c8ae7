// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// grouped_gemm_glu_backward round-trips with and without trans_b.

// CHECK-LABEL: moert.plan @training
// CHECK: %[[W2:.+]] = moert.argument "w2" input : memref<2x16x8xbf16>
// CHECK: %[[GATE:.+]] = moert.alloc "gate_in" : memref<8x16xbf16>
// CHECK: %[[UP:.+]] = moert.alloc "up_in" : memref<8x16xbf16>
// CHECK: %[[G:.+]] = moert.alloc "grad_expert_out" : memref<8x8xbf16>
// CHECK: %[[GG:.+]] = moert.alloc "grad_gate_in" : memref<8x16xbf16>
// CHECK: %[[GU:.+]] = moert.alloc "grad_up_in" : memref<8x16xbf16>
// CHECK: } backward {
// CHECK-NEXT: moert.grouped_gemm_glu_backward ins(a = %[[G]] : memref<8x8xbf16>, b = %[[W2]] : memref<2x16x8xbf16>, gate_in = %[[GATE]] : memref<8x16xbf16>, up_in = %[[UP]] : memref<8x16xbf16>, expert_offsets = %{{[^ ]+}} : memref<3xi32>, expert_rows = %{{[^ ]+}} : memref<2xi32>) outs(grad_gate_in = %[[GG]] : memref<8x16xbf16>, grad_up_in = %[[GU]] : memref<8x16xbf16>) {trans_b}
// CHECK-NEXT: moert.grouped_gemm_glu_backward ins(a = %[[G]] : memref<8x8xbf16>, b = %{{.+}} : memref<2x8x16xbf16>, {{.+}}) outs({{.+}}){{$}}

moert.plan @training attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w = moert.argument "w" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gg = moert.alloc "grad_gate_in" : memref<8x16xbf16>
  %gu = moert.alloc "grad_up_in" : memref<8x16xbf16>
  moert.variant "single+act_backward" forward {
  } backward {
    moert.grouped_gemm_glu_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %gg : memref<8x16xbf16>, grad_up_in = %gu : memref<8x16xbf16>) {trans_b}
    moert.grouped_gemm_glu_backward ins(a = %g : memref<8x8xbf16>, b = %w : memref<2x8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %gg : memref<8x16xbf16>, grad_up_in = %gu : memref<8x16xbf16>)
  }
}
