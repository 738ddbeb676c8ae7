// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// grouped_gemm_combine round-trips with a bias, an epilogue and row_tokens,
// and without them.

// CHECK-LABEL: moert.plan @inference
// CHECK: %[[W2:.+]] = moert.argument "w2" input : memref<2x16x8xbf16>
// CHECK: %[[B2:.+]] = moert.argument "b2" input : memref<2x8xbf16>
// CHECK: %[[OUT:.+]] = moert.argument "out" output : memref<4x8xbf16>
// CHECK: %[[H:.+]] = moert.alloc "hidden" : memref<8x16xbf16>
// CHECK: %[[EO:.+]] = moert.alloc "expert_out" : memref<8x8xbf16>
// CHECK: %[[RT:.+]] = moert.alloc "row_tokens" : memref<8xi32>
// CHECK: moert.variant "single+combine" forward {
// CHECK-NEXT: moert.grouped_gemm_combine ins(a = %[[H]] : memref<8x16xbf16>, b = %[[W2]] : memref<2x16x8xbf16>, bias = %[[B2]] : memref<2x8xbf16>, expert_offsets = %{{.+}} : memref<3xi32>, expert_rows = %{{.+}} : memref<2xi32>, row_tokens = %[[RT]] : memref<8xi32>, indices = %{{.+}} : memref<4x2xi32>, locations = %{{.+}} : memref<4x2xi32>, gates = %{{.+}} : memref<4x2xf32>, capacity = %{{.+}} : memref<1xi32>) outs(c = %[[EO]] : memref<8x8xbf16>, out = %[[OUT]] : memref<4x8xbf16>) {bias_scale = 1.000000e+00 : f64, epilogue = #moe<activation relu>}
// CHECK-NEXT: moert.grouped_gemm_combine ins(a = %[[H]] : memref<8x16xbf16>, b = %[[W2]] : memref<2x16x8xbf16>, expert_offsets = %{{.+}} : memref<3xi32>, expert_rows = %{{.+}} : memref<2xi32>, indices = {{.+}}) outs(c = %[[EO]] : memref<8x8xbf16>, out = %[[OUT]] : memref<4x8xbf16>){{$}}

moert.plan @inference attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %b2 = moert.argument "b2" input : memref<2x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "single+combine" forward {
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xbf16>, out = %out : memref<4x8xbf16>) {bias_scale = 1.0 : f64, epilogue = #moe<activation relu>}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xbf16>, out = %out : memref<4x8xbf16>)
  } backward {
  }
}
