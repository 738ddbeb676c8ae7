// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-combine{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK
// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-combine))' | FileCheck %s

// --moert-fuse-combine on hand-written forwards: each rule that lowered
// layers do not reach, and a pair that qualifies.

// CHECK-LABEL: moert.plan @qualifies
// CHECK: moert.variant "v+combine"
// CHECK: moert.grouped_gemm_combine ins(a = %{{[^ ]+}} : memref<8x16xbf16>, b = %{{[^ ]+}} : memref<2x16x8xbf16>
// CHECK-NOT: moert.combine
// CHECK-LABEL: moert.plan @gemm_keeps_pre
// CHECK-NOT: v+combine
// CHECK-LABEL: moert.plan @gemm_accumulates
// CHECK-NOT: v+combine
// CHECK-LABEL: moert.plan @written_twice
// CHECK-NOT: v+combine
// CHECK-LABEL: moert.plan @other_segments
// CHECK-NOT: v+combine
// CHECK-LABEL: moert.plan @read_between
// CHECK-NOT: v+combine
// CHECK-LABEL: moert.plan @no_producer
// CHECK-NOT: v+combine
// CHECK-LABEL: moert.plan @two_combines
// CHECK-NOT: v+combine

// -----

// REMARK: remark: variant 'v' fused as 'v+combine': 1 grouped_gemm_combine step
moert.plan @qualifies attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>)
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its expert_out keeps 'pre'
moert.plan @gemm_keeps_pre attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>, pre = %pre : memref<8x8xbf16>) {epilogue = #moe<activation relu>}
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its expert_out accumulates
moert.plan @gemm_accumulates attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>) {accumulate}
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

// REMARK: remark: variant 'v' not fused: its expert_out is written by more than one step (a pipelined variant's chunks)
moert.plan @written_twice attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>)
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its expert_out runs over other segments than its routing's experts
moert.plan @other_segments attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o2 : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>)
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

// REMARK: remark: variant 'v' not fused: moert.glu between the GEMM and it uses 'expert_out'
moert.plan @read_between attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>)
    moert.glu ins(gate_in = %eo : memref<8x8xbf16>, up_in = %eo : memref<8x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo2 : memref<8x8xbf16>)
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

// REMARK: remark: variant 'v' not fused: no step before it writes its expert_out
moert.plan @no_producer attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

// REMARK: remark: variant 'v' not fused: its forward has 2 combines, not one
moert.plan @two_combines attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %pre = moert.alloc "hidden_pre" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %eo2 = moert.alloc "expert_out2" : memref<8x8xbf16>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %o2 = moert.alloc "other_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %eo : memref<8x8xbf16>)
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
    moert.combine ins(expert_out = %eo : memref<8x8xbf16>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>, expert_offsets = %o : memref<3xi32>) outs(out = %out : memref<4x8xbf16>)
  } backward {
  }
}
