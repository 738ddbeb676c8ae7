// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// grouped_gemm_activation_backward round-trips with its activation and
// trans_b, and without trans_b.

// CHECK-LABEL: moert.plan @training
// CHECK: %[[W2:.+]] = moert.argument "w2" input : memref<2x16x8xbf16>
// CHECK: %[[O:.+]] = moert.alloc "expert_offsets" : memref<3xi32>
// CHECK: %[[R:.+]] = moert.alloc "expert_rows" : memref<2xi32>
// CHECK: %[[PRE:.+]] = moert.alloc "hidden_pre" : memref<8x16xbf16>
// CHECK: %[[G:.+]] = moert.alloc "grad_expert_out" : memref<8x8xbf16>
// CHECK: %[[GHP:.+]] = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
// CHECK: } backward {
// CHECK-NEXT: moert.grouped_gemm_activation_backward ins(a = %[[G]] : memref<8x8xbf16>, b = %[[W2]] : memref<2x16x8xbf16>, pre = %[[PRE]] : memref<8x16xbf16>, expert_offsets = %[[O]] : memref<3xi32>, expert_rows = %[[R]] : memref<2xi32>) outs(c = %[[GHP]] : memref<8x16xbf16>) {activation = #moe<activation gelu>, trans_b}
// CHECK-NEXT: moert.grouped_gemm_activation_backward ins(a = %[[G]] : memref<8x8xbf16>, b = %{{.+}} : memref<2x8x16xbf16>, {{.+}}) outs(c = %[[GHP]] : memref<8x16xbf16>) {activation = #moe<activation silu>}{{$}}

moert.plan @training attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = gelu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w = moert.argument "w" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %pre = moert.alloc "hidden_pre" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  moert.variant "single+act_backward" forward {
  } backward {
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, pre = %pre : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %ghp : memref<8x16xbf16>) {activation = #moe<activation gelu>, trans_b}
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w : memref<2x8x16xbf16>, pre = %pre : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %ghp : memref<8x16xbf16>) {activation = #moe<activation silu>}
  }
}
