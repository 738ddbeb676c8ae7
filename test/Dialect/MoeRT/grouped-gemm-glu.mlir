// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// grouped_gemm_glu round-trips: the inference form (no gate_in / up_in)
// reading x through row_tokens, and the training form writing gate_in and
// up_in without row_tokens (its optional operands kept apart in the
// generic syntax too).

// CHECK-LABEL: moert.plan @inference
// CHECK: %[[X:.+]] = moert.argument "x" input : memref<8x8xbf16>
// CHECK: %[[W1:.+]] = moert.argument "w1" input : memref<2x8x16xbf16>
// CHECK: %[[W3:.+]] = moert.argument "w3" input : memref<2x8x16xbf16>
// CHECK: %[[O:.+]] = moert.alloc "expert_offsets" : memref<3xi32>
// CHECK: %[[R:.+]] = moert.alloc "expert_rows" : memref<2xi32>
// CHECK: %[[RT:.+]] = moert.alloc "row_tokens" : memref<8xi32>
// CHECK: %[[H:.+]] = moert.alloc "hidden" : memref<8x16xbf16>
// CHECK: moert.variant "single+gather+glu" forward {
// CHECK-NEXT: moert.grouped_gemm_glu ins(a = %[[X]] : memref<8x8xbf16>, b = %[[W1]] : memref<2x8x16xbf16>, b_up = %[[W3]] : memref<2x8x16xbf16>, expert_offsets = %[[O]] : memref<3xi32>, expert_rows = %[[R]] : memref<2xi32>, row_tokens = %[[RT]] : memref<8xi32>) outs(c = %[[H]] : memref<8x16xbf16>){{$}}
// CHECK-NEXT: } backward {

moert.plan @inference attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "single+gather+glu" forward {
    moert.grouped_gemm_glu ins(a = %x : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>) outs(c = %h : memref<8x16xbf16>)
  } backward {
  }
}

// CHECK-LABEL: moert.plan @training
// CHECK: %[[D:.+]] = moert.alloc "dispatched" : memref<8x8xf16>
// CHECK: %[[GATE:.+]] = moert.alloc "gate_in" : memref<8x16xf16>
// CHECK: %[[UP:.+]] = moert.alloc "up_in" : memref<8x16xf16>
// CHECK: %[[H:.+]] = moert.alloc "hidden" : memref<8x16xf16>
// CHECK: moert.variant "single+glu" forward {
// CHECK-NEXT: moert.grouped_gemm_glu ins(a = %[[D]] : memref<8x8xf16>, b = %{{.+}} : memref<2x8x16xf16>, b_up = %{{.+}} : memref<2x8x16xf16>, expert_offsets = %{{.+}} : memref<3xi32>, expert_rows = %{{[^ ]+}} : memref<2xi32>) outs(c = %[[H]] : memref<8x16xf16>, gate_in = %[[GATE]] : memref<8x16xf16>, up_in = %[[UP]] : memref<8x16xf16>){{$}}
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.glu_backward ins(gate_in = %[[GATE]] : memref<8x16xf16>, up_in = %[[UP]] : memref<8x16xf16>,

moert.plan @training attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = f16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w1 = moert.argument "w1" input : memref<2x8x16xf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %d = moert.alloc "dispatched" : memref<8x8xf16>
  %gate = moert.alloc "gate_in" : memref<8x16xf16>
  %up = moert.alloc "up_in" : memref<8x16xf16>
  %h = moert.alloc "hidden" : memref<8x16xf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xf16>
  %ggate = moert.alloc "grad_gate_in" : memref<8x16xf16>
  %gup = moert.alloc "grad_up_in" : memref<8x16xf16>
  moert.variant "single+glu" forward {
    moert.grouped_gemm_glu ins(a = %d : memref<8x8xf16>, b = %w1 : memref<2x8x16xf16>, b_up = %w3 : memref<2x8x16xf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xf16>, gate_in = %gate : memref<8x16xf16>, up_in = %up : memref<8x16xf16>)
  } backward {
    moert.glu_backward ins(gate_in = %gate : memref<8x16xf16>, up_in = %up : memref<8x16xf16>, grad = %gh : memref<8x16xf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %ggate : memref<8x16xf16>, grad_up_in = %gup : memref<8x16xf16>)
  }
}
