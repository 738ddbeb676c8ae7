// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu))' --verify-diagnostics

// [plan-3] of --moert-fuse-glu: it runs before --moert-plan-memory, since
// the buffers of the variants it adds need places too, and the buffers of a
// variant it adds have names no buffer of the plan has.

// expected-error @+1 {{[plan-3] --moert-fuse-glu must run before --moert-plan-memory: the workspace is placed}}
moert.plan @placed attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, workspace_bytes = 4096 : i64} {
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

// expected-error @+1 {{[plan-3] --moert-fuse-glu: buffer 'v+glu.hidden' of variant 'v+glu' is defined in the plan already}}
moert.plan @buffer_name_taken attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
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
  %taken = moert.alloc "v+glu.hidden" : memref<8x16xbf16>
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
