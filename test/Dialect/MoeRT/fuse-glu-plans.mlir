// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu))' | FileCheck %s
// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK

// --moert-fuse-glu on plans written by hand: the plan fused as a control,
// then variations the pass fuses differently or must leave alone, each with
// the remark saying why.

// The one plan fused, as a control: the `v.` prefix becomes `v+glu.` in
// the copy's buffer names, and with no other step reading gate_proj and
// up_proj the copy has no buffers for them.
// CHECK-LABEL: moert.plan @control
// CHECK: %[[W1:.+]] = moert.argument "w1" input
// CHECK: %[[W3:.+]] = moert.argument "w3" input
// CHECK: moert.variant "v" forward {
// CHECK: moert.glu
// CHECK: %[[OFFSETS:.+]] = moert.alloc "v+glu.expert_offsets" : memref<3xi32>
// CHECK-NEXT: %[[ROWS:.+]] = moert.alloc "v+glu.expert_rows" : memref<2xi32>
// CHECK-NEXT: %[[D:.+]] = moert.alloc "v+glu.dispatched" : memref<8x8xbf16>
// CHECK-NEXT: %[[H:.+]] = moert.alloc "v+glu.hidden" : memref<8x16xbf16>
// CHECK-NEXT: moert.alloc "v+glu.expert_out" : memref<8x8xbf16>
// CHECK-NEXT: moert.variant "v+glu" forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate
// CHECK-NEXT: moert.dispatch
// CHECK-NEXT: moert.grouped_gemm_glu ins(a = %[[D]] : memref<8x8xbf16>, b = %[[W1]] : memref<2x8x16xbf16>, b_up = %[[W3]] : memref<2x8x16xbf16>, expert_offsets = %[[OFFSETS]] : memref<3xi32>, expert_rows = %[[ROWS]] : memref<2xi32>) outs(c = %[[H]] : memref<8x16xbf16>){{$}}
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[H]] :
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: }
// CHECK-NEXT: }
// REMARK: remark: variant 'v' fused as 'v+glu': 1 grouped_gemm_glu step, gate_in and up_in not written

moert.plan @control attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// A step other than the fused ones reads up_in: the fused step writes
// both products (the step writes both or neither).
// CHECK-LABEL: moert.plan @up_in_read_after
// CHECK: %[[GATE:.+]] = moert.alloc "v+glu.gate_proj" : memref<8x16xbf16>
// CHECK-NEXT: %[[UP:.+]] = moert.alloc "v+glu.up_proj" : memref<8x16xbf16>
// CHECK: moert.variant "v+glu" forward {
// CHECK: moert.grouped_gemm_glu ins({{.+}}) outs(c = %{{[^ ]+}} : memref<8x16xbf16>, gate_in = %[[GATE]] : memref<8x16xbf16>, up_in = %[[UP]] : memref<8x16xbf16>)
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[UP]] :
// REMARK: remark: variant 'v' fused as 'v+glu': 1 grouped_gemm_glu step, writing gate_in and up_in for the steps that read them

moert.plan @up_in_read_after attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %up : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Two glu steps, the second one's gate GEMM with an epilogue: the first is
// fused, the second left as it is in the copy.
// CHECK-LABEL: moert.plan @two_glus
// CHECK: moert.variant "v+glu" forward {
// CHECK: moert.grouped_gemm_glu
// CHECK-NEXT: moert.grouped_gemm {{.+}} outs(c = %{{[^ ]+}} : memref<8x16xbf16>) {epilogue = #moe<activation silu>}
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.glu
// CHECK-NEXT: moert.grouped_gemm
// REMARK: remark: variant 'v': glu step 2 of 2 left unfused: the moert.grouped_gemm writing its gate_in has an epilogue
// REMARK: remark: variant 'v' fused as 'v+glu': 1 grouped_gemm_glu step, gate_in and up_in not written

moert.plan @two_glus attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %gate2 = moert.alloc "v.gate_proj2" : memref<8x16xbf16>
  %up2 = moert.alloc "v.up_proj2" : memref<8x16xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate2 : memref<8x16xbf16>) {epilogue = #moe<activation silu>}
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up2 : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate2 : memref<8x16xbf16>, up_in = %up2 : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the gate GEMM has an epilogue.
// CHECK-LABEL: moert.plan @gate_epilogue
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its gate_in has an epilogue

moert.plan @gate_epilogue attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>) {epilogue = #moe<activation silu>}
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the gate GEMM adds a bias.
// CHECK-LABEL: moert.plan @gate_bias
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its gate_in has a bias

moert.plan @gate_bias attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %bias = moert.alloc "v.bias" : memref<2x16xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, bias = %bias : memref<2x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the gate GEMM keeps pre.
// CHECK-LABEL: moert.plan @gate_pre
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its gate_in keeps 'pre'

moert.plan @gate_pre attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %pre = moert.alloc "v.pre" : memref<8x16xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>, pre = %pre : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the up GEMM reads b transposed.
// CHECK-LABEL: moert.plan @up_trans_b
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its up_in reads b transposed

moert.plan @up_trans_b attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>) {trans_b}
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the up GEMM accumulates.
// CHECK-LABEL: moert.plan @up_accumulate
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its up_in accumulates

moert.plan @up_accumulate attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>) {accumulate}
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the gate GEMM has a bias_scale other than 1.
// CHECK-LABEL: moert.plan @gate_bias_scale
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its gate_in scales its bias

moert.plan @gate_bias_scale attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>) {bias_scale = 5.000000e-01 : f64}
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the GEMMs read different a.
// CHECK-LABEL: moert.plan @different_a
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the GEMMs writing its gate_in and up_in read different 'a' ('v.dispatched', 'x')

moert.plan @different_a attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %x : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the GEMMs read x through different row_tokens.
// CHECK-LABEL: moert.plan @different_row_tokens
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the GEMMs writing its gate_in and up_in read 'a' through different 'row_tokens'

moert.plan @different_row_tokens attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %rt1 = moert.alloc "v.row_tokens1" : memref<8xi32>
  %rt2 = moert.alloc "v.row_tokens2" : memref<8xi32>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %x : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt1 : memref<8xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %x : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt2 : memref<8xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the up GEMM follows other expert segments.
// CHECK-LABEL: moert.plan @different_segments
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the GEMMs writing its gate_in and up_in and the glu follow different expert segments

moert.plan @different_segments attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %offsets2 = moert.alloc "v.expert_offsets2" : memref<3xi32>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets2 : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the glu writes f16 from bf16 products.
// CHECK-LABEL: moert.plan @mixed_types
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: its gate_in, up_in and c are bf16, bf16 and f16, not one element type

moert.plan @mixed_types attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %h16 = moert.alloc "v.hidden16" : memref<8x16xf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h16 : memref<8x16xf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: nothing writes gate_in before the glu.
// CHECK-LABEL: moert.plan @gate_in_not_written
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: no step before it writes its gate_in

moert.plan @gate_in_not_written attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: up_in is written as pre, not as c.
// CHECK-LABEL: moert.plan @up_in_as_pre
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: its up_in is written by moert.grouped_gemm, not as 'c' of a moert.grouped_gemm

moert.plan @up_in_as_pre attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %other = moert.alloc "v.other" : memref<8x16xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %other : memref<8x16xbf16>, pre = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: gate_in and up_in are one buffer.
// CHECK-LABEL: moert.plan @gate_in_is_up_in
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: its gate_in and up_in are one buffer

moert.plan @gate_in_is_up_in attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %gate : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the glu writes c over its gate_in.
// CHECK-LABEL: moert.plan @c_over_gate_in
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: it writes 'c' over its 'gate_in'

moert.plan @c_over_gate_in attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %gate : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: a step between the GEMMs and the glu reads gate_in.
// CHECK-LABEL: moert.plan @read_between
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: moert.grouped_gemm between its GEMMs and it uses 'v.gate_proj'

moert.plan @read_between attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  %y2 = moert.alloc "v.expert_out2" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %gate : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y2 : memref<8x8xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: a step between the GEMMs writes what they read.
// CHECK-LABEL: moert.plan @write_between
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: moert.dispatch between its GEMMs and it writes 'v.dispatched', which they read

moert.plan @write_between attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
// -----

// Not fused: the plan has a variant 'v+glu' already (which has
// no glu itself).
// CHECK-LABEL: moert.plan @variant_exists
// CHECK-NOT: grouped_gemm_glu
// CHECK: moert.variant "v+glu"
// CHECK-NOT: moert.variant
// REMARK: remark: variant 'v' not fused: the plan has a variant 'v+glu' already
// REMARK: remark: variant 'v+glu' not fused: its forward has no glu step

moert.plan @variant_exists attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %out = moert.argument "out" output : memref<8x8xbf16>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %logits = moert.alloc "v.logits" : memref<8x2xf32>
  %scores = moert.alloc "v.scores" : memref<8x2xf32>
  %indices = moert.alloc "v.indices" : memref<8x1xi32>
  %locations = moert.alloc "v.locations" : memref<8x1xi32>
  %gates = moert.alloc "v.gates" : memref<8x1xf32>
  %capacity = moert.alloc "v.capacity" : memref<1xi32>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %d = moert.alloc "v.dispatched" : memref<8x8xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  %h = moert.alloc "v.hidden" : memref<8x16xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w3 : memref<2x8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
  moert.variant "v+glu" forward {
  } backward {
  }
}
// -----

// Not fused: the glu writes over the GEMMs' a (K = N).
// CHECK-LABEL: moert.plan @c_is_a
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'v' not fused: the fused step would read and write 'v.a'

moert.plan @c_is_a attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w1 = moert.argument "w1" input : memref<2x16x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x16x16xbf16>
  %offsets = moert.alloc "v.expert_offsets" : memref<3xi32>
  %rows = moert.alloc "v.expert_rows" : memref<2xi32>
  %a = moert.alloc "v.a" : memref<8x16xbf16>
  %gate = moert.alloc "v.gate_proj" : memref<8x16xbf16>
  %up = moert.alloc "v.up_proj" : memref<8x16xbf16>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %a : memref<8x16xbf16>, b = %w1 : memref<2x16x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %gate : memref<8x16xbf16>)
    moert.grouped_gemm ins(a = %a : memref<8x16xbf16>, b = %w3 : memref<2x16x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %up : memref<8x16xbf16>)
    moert.glu ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %a : memref<8x16xbf16>)
  } backward {
  }
}
