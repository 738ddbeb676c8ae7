// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch))' | FileCheck %s
// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK

// --moert-fuse-dispatch on plans written by hand: the one plan fused as a
// control, then the same plan where the pass must leave it alone.

// A variant's `v.` prefix becomes `v+gather.` in the copy's buffer names.
// CHECK-LABEL: moert.plan @control
// CHECK: %[[X:.+]] = moert.argument "x" input
// CHECK: %[[D:.+]] = moert.alloc "v.dispatched"
// CHECK: moert.variant "v" forward {
// CHECK: moert.dispatch {{.+}} outs(dispatched = %[[D]] :
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[D]] :
// CHECK: moert.alloc "v+gather.logits" : memref<8x2xf32>
// CHECK-NOT: v+gather.dispatched
// CHECK: %[[H:.+]] = moert.alloc "v+gather.hidden" : memref<8x8xbf16>
// CHECK-NEXT: moert.alloc "v+gather.expert_out" : memref<8x8xbf16>
// CHECK-NEXT: %[[RT:.+]] = moert.alloc "v+gather.row_tokens" : memref<8xi32>
// CHECK-NEXT: moert.variant "v+gather" forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate
// CHECK-NEXT: moert.dispatch_rows {{.+}} outs(row_tokens = %[[RT]] : memref<8xi32>)
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[X]] : memref<8x8xbf16>, {{.+}}, row_tokens = %[[RT]] : memref<8xi32>) outs(c = %[[H]] : memref<8x8xbf16>) {epilogue = #moe<activation relu>}
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[H]] :
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: }
// CHECK-NEXT: }
// REMARK: remark: variant 'v' fused as 'v+gather': dispatch_rows, and the grouped GEMMs read 'x' through 'v+gather.row_tokens'

moert.plan @control attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x8xbf16>
  %w2 = moert.argument "w2" input : memref<2x8x8xbf16>
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
  %h = moert.alloc "v.hidden" : memref<8x8xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x8xbf16>) {epilogue = #moe<activation relu>}
    moert.grouped_gemm ins(a = %h : memref<8x8xbf16>, b = %w2 : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}

// -----

// Not fused: a plan for several ranks (exchanges move whole blocks).
// CHECK-LABEL: moert.plan @multi_rank
// CHECK-NOT: row_tokens
// CHECK-NOT: v+gather
// CHECK: moert.variant "v" forward {
// CHECK-NOT: moert.variant
// REMARK: remark: not fused: the plan runs on 2 ranks, whose exchanges move whole dispatch blocks

moert.plan @multi_rank attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, world_size = 2 : i64} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x8xbf16>
  %w2 = moert.argument "w2" input : memref<2x8x8xbf16>
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
  %h = moert.alloc "v.hidden" : memref<8x8xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x8xbf16>) {epilogue = #moe<activation relu>}
    moert.grouped_gemm ins(a = %h : memref<8x8xbf16>, b = %w2 : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %y : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}

// -----

// Not fused: another step (combine) reads the dispatched rows.
// CHECK-LABEL: moert.plan @read_by_combine
// CHECK-NOT: row_tokens
// CHECK: moert.variant "v" forward {
// CHECK-NOT: moert.variant
// REMARK: remark: variant 'v' not fused: moert.combine uses the dispatched rows as 'expert_out', not as the A operand of a grouped GEMM

moert.plan @read_by_combine attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x8xbf16>
  %wg = moert.argument "wg" input : memref<8x2xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x8xbf16>
  %w2 = moert.argument "w2" input : memref<2x8x8xbf16>
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
  %h = moert.alloc "v.hidden" : memref<8x8xbf16>
  %y = moert.alloc "v.expert_out" : memref<8x8xbf16>
  moert.variant "v" forward {
    moert.router ins(x = %x : memref<8x8xbf16>, wg = %wg : memref<8x2xbf16>) outs(logits = %logits : memref<8x2xf32>)
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    moert.dispatch ins(x = %x : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(dispatched = %d : memref<8x8xbf16>)
    moert.grouped_gemm ins(a = %d : memref<8x8xbf16>, b = %w1 : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %h : memref<8x8xbf16>) {epilogue = #moe<activation relu>}
    moert.grouped_gemm ins(a = %h : memref<8x8xbf16>, b = %w2 : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %y : memref<8x8xbf16>)
    moert.combine ins(expert_out = %d : memref<8x8xbf16>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(out = %out : memref<8x8xbf16>)
  } backward {
  }
}
