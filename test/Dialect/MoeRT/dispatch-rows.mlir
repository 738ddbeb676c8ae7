// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// The steps of a gather-fused variant round-trip: dispatch_rows, and the
// optional row_tokens of grouped_gemm and of grouped_gemm_wgrad (its two
// optional operands kept apart, in the generic syntax too).

// CHECK-LABEL: moert.plan @gathered
// CHECK: %[[X:.+]] = moert.argument "x" input : memref<8x8xbf16>
// CHECK: %[[B1:.+]] = moert.argument "b1" input : memref<2x8xbf16>
// CHECK: %[[GRAD_B1:.+]] = moert.argument "grad_b1" grad_output : memref<2x8xbf16>
// CHECK: %[[RT:.+]] = moert.alloc "row_tokens" : memref<8xi32>
// CHECK: moert.dispatch_rows ins(indices = %{{.+}} : memref<8x1xi32>, locations = %{{.+}} : memref<8x1xi32>, capacity = %{{.+}} : memref<1xi32>, expert_offsets = %{{.+}} : memref<3xi32>) outs(row_tokens = %[[RT]] : memref<8xi32>)
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[X]] : memref<8x8xbf16>, b = %{{.+}} : memref<2x8x8xbf16>, bias = %[[B1]] : memref<2x8xbf16>, expert_offsets = %{{.+}} : memref<3xi32>, expert_rows = %{{.+}} : memref<2xi32>, row_tokens = %[[RT]] : memref<8xi32>) outs(c = %{{.+}} : memref<8x8xbf16>, pre = %{{.+}} : memref<8x8xbf16>) {epilogue = #moe<activation relu>}
// CHECK: } backward {
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[X]] : memref<8x8xbf16>, grad_c = %{{.+}} : memref<8x8xbf16>, expert_offsets = %{{.+}} : memref<3xi32>, expert_rows = %{{.+}} : memref<2xi32>, row_tokens = %[[RT]] : memref<8xi32>) outs(grad_b = %{{.+}} : memref<2x8x8xbf16>, grad_bias = %[[GRAD_B1]] : memref<2x8xbf16>)
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[X]] : memref<8x8xbf16>, {{.+}}, row_tokens = %[[RT]] : memref<8xi32>) outs(grad_b = %{{[^ ]+}} : memref<2x8x8xbf16>) {accumulate}
// CHECK-NEXT: }

moert.plan @gathered attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x8xbf16>
  %b1 = moert.argument "b1" input : memref<2x8xbf16>
  %gw1 = moert.argument "grad_w1" grad_output : memref<2x8x8xbf16>
  %gb1 = moert.argument "grad_b1" grad_output : memref<2x8xbf16>
  %i = moert.alloc "indices" : memref<8x1xi32>
  %l = moert.alloc "locations" : memref<8x1xi32>
  %c = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %h = moert.alloc "hidden" : memref<8x8xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %gpre = moert.alloc "grad_hidden_pre" : memref<8x8xbf16>
  moert.variant "single+gather" forward {
    moert.dispatch_rows ins(indices = %i : memref<8x1xi32>, locations = %l : memref<8x1xi32>, capacity = %c : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(row_tokens = %rt : memref<8xi32>)
    moert.grouped_gemm ins(a = %x : memref<8x8xbf16>, b = %w1 : memref<2x8x8xbf16>, bias = %b1 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>) outs(c = %h : memref<8x8xbf16>, pre = %pre : memref<8x8xbf16>) {epilogue = #moe<activation relu>}
  } backward {
    moert.grouped_gemm_wgrad ins(a = %x : memref<8x8xbf16>, grad_c = %gpre : memref<8x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>) outs(grad_b = %gw1 : memref<2x8x8xbf16>, grad_bias = %gb1 : memref<2x8xbf16>)
    moert.grouped_gemm_wgrad ins(a = %x : memref<8x8xbf16>, grad_c = %gpre : memref<8x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>) outs(grad_b = %gw1 : memref<2x8x8xbf16>) {accumulate}
  }
}
