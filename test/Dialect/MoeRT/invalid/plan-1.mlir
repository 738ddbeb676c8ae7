// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [plan-1]: the operands of a step have the shapes their
// roles need, with sizes that agree between roles.

moert.plan @router_shapes attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
  %wg = moert.argument "wg" input : memref<5x2xf32>
  %logits = moert.alloc "logits" : memref<8x2xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'wg' must be [d = 4, E], got 'memref<5x2xf32>'}}
    moert.router ins(x = %x : memref<8x4xf32>, wg = %wg : memref<5x2xf32>) outs(logits = %logits : memref<8x2xf32>)
  } backward {
  }
}

// -----

moert.plan @gate_top_k attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %logits = moert.alloc "logits" : memref<8x4xf32>
  %scores = moert.alloc "scores" : memref<8x4xf32>
  %indices = moert.alloc "indices" : memref<8x2xi32>
  %locations = moert.alloc "locations" : memref<8x2xi32>
  %gates = moert.alloc "gates" : memref<8x2xf32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<5xi32>
  %rows = moert.alloc "expert_rows" : memref<4xi32>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] top_k = 3 must equal k = 2 of the routing buffers}}
    moert.gate ins(logits = %logits : memref<8x4xf32>) outs(scores = %scores : memref<8x4xf32>, indices = %indices : memref<8x2xi32>, locations = %locations : memref<8x2xi32>, gates = %gates : memref<8x2xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<5xi32>, expert_rows = %rows : memref<4xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 3 : i64}
  } backward {
  }
}

// -----

moert.plan @offsets_shape attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
  %indices = moert.alloc "indices" : memref<8x2xi32>
  %locations = moert.alloc "locations" : memref<8x2xi32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<4xi32>
  %d = moert.alloc "dispatched" : memref<16x5xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'dispatched' must be [R = 16, d = 4], got 'memref<16x5xf32>'}}
    moert.dispatch ins(x = %x : memref<8x4xf32>, indices = %indices : memref<8x2xi32>, locations = %locations : memref<8x2xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<4xi32>) outs(dispatched = %d : memref<16x5xf32>)
  } backward {
  }
}

// -----

moert.plan @gemm_inner_dim attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "a" : memref<16x4xf32>
  %w = moert.argument "w1" input : memref<2x8x4xf32>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %c = moert.alloc "c" : memref<16x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'b' must be [G = 2, K = 4, N], got 'memref<2x8x4xf32>'}}
    moert.grouped_gemm ins(a = %a : memref<16x4xf32>, b = %w : memref<2x8x4xf32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %c : memref<16x4xf32>)
  } backward {
  }
}

// -----

moert.plan @gemm_segments attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "a" : memref<16x4xf32>
  %w = moert.argument "w1" input : memref<2x4x8xf32>
  %offsets = moert.alloc "expert_offsets" : memref<2xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %c = moert.alloc "c" : memref<16x8xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'expert_offsets' must be [G+1 = 3], got 'memref<2xi32>'}}
    moert.grouped_gemm ins(a = %a : memref<16x4xf32>, b = %w : memref<2x4x8xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %c : memref<16x8xf32>)
  } backward {
  }
}

// -----

moert.plan @shard_routing_choices attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %i = moert.alloc "indices" : memref<8x1xi32>
  %l = moert.alloc "locations" : memref<8x1xi32>
  %g = moert.alloc "gates" : memref<8x1xf32>
  %c = moert.alloc "capacity" : memref<1xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %vi = moert.alloc "shard_indices" : memref<8x3xi32>
  %vl = moert.alloc "shard_locations" : memref<8x3xi32>
  %vg = moert.alloc "shard_gates" : memref<8x3xf32>
  %vo = moert.alloc "shard_expert_offsets" : memref<5xi32>
  %vr = moert.alloc "shard_expert_rows" : memref<4xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] the out routing must be [T, k * s] over E * s experts: k = 1, E = 2, s = 2, got k * s = 3 and E * s = 4}}
    moert.shard_routing ins(indices = %i : memref<8x1xi32>, locations = %l : memref<8x1xi32>, gates = %g : memref<8x1xf32>, capacity = %c : memref<1xi32>, expert_rows = %r : memref<2xi32>) outs(indices = %vi : memref<8x3xi32>, locations = %vl : memref<8x3xi32>, gates = %vg : memref<8x3xf32>, expert_offsets = %vo : memref<5xi32>, expert_rows = %vr : memref<4xi32>) {shards = 2 : i64}
  } backward {
  }
}

// -----

moert.plan @shard_routing_offsets attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %i = moert.alloc "indices" : memref<8x1xi32>
  %l = moert.alloc "locations" : memref<8x1xi32>
  %g = moert.alloc "gates" : memref<8x1xf32>
  %c = moert.alloc "capacity" : memref<1xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %vi = moert.alloc "shard_indices" : memref<8x2xi32>
  %vl = moert.alloc "shard_locations" : memref<8x2xi32>
  %vg = moert.alloc "shard_gates" : memref<8x2xf32>
  %vo = moert.alloc "shard_expert_offsets" : memref<4xi32>
  %vr = moert.alloc "shard_expert_rows" : memref<4xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'out expert_offsets' must be [Es+1 = 5], got 'memref<4xi32>'}}
    moert.shard_routing ins(indices = %i : memref<8x1xi32>, locations = %l : memref<8x1xi32>, gates = %g : memref<8x1xf32>, capacity = %c : memref<1xi32>, expert_rows = %r : memref<2xi32>) outs(indices = %vi : memref<8x2xi32>, locations = %vl : memref<8x2xi32>, gates = %vg : memref<8x2xf32>, expert_offsets = %vo : memref<4xi32>, expert_rows = %vr : memref<4xi32>) {shards = 2 : i64}
  } backward {
  }
}

// -----

moert.plan @shard_routing_backward_choices attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %vg = moert.alloc "shard_grad_gates" : memref<8x4xf32>
  %g = moert.alloc "grad_gates" : memref<8x1xf32>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-1] 'in grad_gates' must be [T, k * s]: k = 1, s = 2, got k * s = 4}}
    moert.shard_routing_backward ins(grad_gates = %vg : memref<8x4xf32>) outs(grad_gates = %g : memref<8x1xf32>) {shards = 2 : i64}
  }
}

// -----

// A gather of an empty or rank-0 buffer is rejected, not divided by zero.
moert.plan @gather_empty attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w = moert.argument "w1" input : memref<0x8x6xf32>
  %f = moert.alloc "full_w1" : memref<2x8x6xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] the full buffer must be [W * L, ...] of the local one 'memref<0x8x6xf32>', got 'memref<2x8x6xf32>'}}
    moert.all_gather ins(input = %w : memref<0x8x6xf32>) outs(output = %f : memref<2x8x6xf32>)
  } backward {
  }
}

// -----

moert.plan @gather_scalar attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w = moert.argument "w1" input : memref<f32>
  %f = moert.alloc "full_w1" : memref<f32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] the full buffer must be [W * L, ...] of the local one 'memref<f32>', got 'memref<f32>'}}
    moert.all_gather ins(input = %w : memref<f32>) outs(output = %f : memref<f32>)
  } backward {
  }
}

// -----

// k * s is checked for overflow: 4 * (2^62 + 2) wraps to 8 in 64 bits.
moert.plan @shards_overflow attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %g = moert.alloc "shard_grad_gates" : memref<8x8xf32>
  %o = moert.alloc "grad_gates" : memref<8x4xf32>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-1] 'in grad_gates' must be [T, k * s]: k = 4, s = 4611686018427387906, got k * s = 8}}
    moert.shard_routing_backward ins(grad_gates = %g : memref<8x8xf32>) outs(grad_gates = %o : memref<8x4xf32>) {shards = 4611686018427387906 : i64}
  }
}

// -----

// Gather-fused steps (--moert-fuse-dispatch): dispatch_rows maps the rows
// of its gate's layout ([R] i32), and a GEMM given row_tokens has one per
// row of its product and reads the layer's tokens [T, K] through them.

moert.plan @dispatch_rows_ragged_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %logits = moert.alloc "logits" : memref<8x2xf32>
  %scores = moert.alloc "scores" : memref<8x2xf32>
  %indices = moert.alloc "indices" : memref<8x1xi32>
  %locations = moert.alloc "locations" : memref<8x1xi32>
  %gates = moert.alloc "gates" : memref<8x1xf32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %rt = moert.alloc "row_tokens" : memref<16xi32>
  moert.variant "v" forward {
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    // expected-error @+1 {{[plan-1] 'row_tokens' must be [R = 8], the rows of the ragged dispatch buffer (min(E * C, T * k)), got 'memref<16xi32>'}}
    moert.dispatch_rows ins(indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(row_tokens = %rt : memref<16xi32>)
  } backward {
  }
}

// -----

moert.plan @dispatch_rows_padded_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %logits = moert.alloc "logits" : memref<8x2xf32>
  %scores = moert.alloc "scores" : memref<8x2xf32>
  %indices = moert.alloc "indices" : memref<8x1xi32>
  %locations = moert.alloc "locations" : memref<8x1xi32>
  %gates = moert.alloc "gates" : memref<8x1xf32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  moert.variant "v" forward {
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout padded>, top_k = 1 : i64}
    // expected-error @+1 {{[plan-1] 'row_tokens' must be [R = 16], the rows of the padded dispatch buffer (E * C), got 'memref<8xi32>'}}
    moert.dispatch_rows ins(indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(row_tokens = %rt : memref<8xi32>)
  } backward {
  }
}

// -----

moert.plan @dispatch_rows_rank attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %logits = moert.alloc "logits" : memref<8x2xf32>
  %scores = moert.alloc "scores" : memref<8x2xf32>
  %indices = moert.alloc "indices" : memref<8x1xi32>
  %locations = moert.alloc "locations" : memref<8x1xi32>
  %gates = moert.alloc "gates" : memref<8x1xf32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %rt = moert.alloc "row_tokens" : memref<8x1xi32>
  moert.variant "v" forward {
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    // expected-error @+1 {{[plan-1] 'row_tokens' must be [R], got 'memref<8x1xi32>'}}
    moert.dispatch_rows ins(indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(row_tokens = %rt : memref<8x1xi32>)
  } backward {
  }
}

// -----

moert.plan @gemm_row_tokens_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<8x8xbf16>
  %w = moert.argument "w1" input : memref<2x8x8xbf16>
  %gw = moert.argument "grad_w1" grad_output : memref<2x8x8xbf16>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<16xi32>
  %c = moert.alloc "c" : memref<8x8xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'row_tokens' must be [R = 8], got 'memref<16xi32>'}}
    moert.grouped_gemm ins(a = %a : memref<8x8xbf16>, b = %w : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt : memref<16xi32>) outs(c = %c : memref<8x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_gathered_a_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<16x8xbf16>
  %w = moert.argument "w1" input : memref<2x8x8xbf16>
  %gw = moert.argument "grad_w1" grad_output : memref<2x8x8xbf16>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %c = moert.alloc "c" : memref<8x8xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] with 'row_tokens', 'a' must be the layer's tokens [T = 8, K], got 'memref<16x8xbf16>'}}
    moert.grouped_gemm ins(a = %a : memref<16x8xbf16>, b = %w : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt : memref<8xi32>) outs(c = %c : memref<8x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @wgrad_row_tokens_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<8x8xbf16>
  %w = moert.argument "w1" input : memref<2x8x8xbf16>
  %gw = moert.argument "grad_w1" grad_output : memref<2x8x8xbf16>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<16xi32>
  %c = moert.alloc "c" : memref<8x8xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'row_tokens' must be [R = 8], got 'memref<16xi32>'}}
    moert.grouped_gemm_wgrad ins(a = %a : memref<8x8xbf16>, grad_c = %c : memref<8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt : memref<16xi32>) outs(grad_b = %gw : memref<2x8x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @wgrad_gathered_a_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<16x8xbf16>
  %w = moert.argument "w1" input : memref<2x8x8xbf16>
  %gw = moert.argument "grad_w1" grad_output : memref<2x8x8xbf16>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %c = moert.alloc "c" : memref<8x8xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] with 'row_tokens', 'a' must be the layer's tokens [T = 8, K], got 'memref<16x8xbf16>'}}
    moert.grouped_gemm_wgrad ins(a = %a : memref<16x8xbf16>, grad_c = %c : memref<8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt : memref<8xi32>) outs(grad_b = %gw : memref<2x8x8xbf16>)
  } backward {
  }
}

// -----

// grouped_gemm_glu (--moert-fuse-glu): a [R, K] (or x [T, K] with
// row_tokens), b and b_up one [G, K, N], c, gate_in and up_in [R, N].

moert.plan @gemm_glu_inner_dim attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x4x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'b' must be [G = 2, K = 8, N], got 'memref<2x4x16xbf16>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x4x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_up_shape attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'b_up' must be [G = 2, K = 8, N = 16], got 'memref<2x8x8xbf16>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_segments attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<2xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'expert_offsets' must be [G+1 = 3], got 'memref<2xi32>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<2xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_c_shape attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x8xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'c' must be [R = 8, N = 16], got 'memref<8x8xbf16>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x8xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_gate_in_shape attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x8xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'gate_in' must be [R = 8, N = 16], got 'memref<8x8xbf16>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x8xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_up_in_shape attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<16x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'up_in' must be [R = 8, N = 16], got 'memref<16x16xbf16>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<16x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_row_tokens_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<16xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'row_tokens' must be [R = 8], got 'memref<16xi32>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<16xi32>) outs(c = %h : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_gathered_a_rows attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<16x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] with 'row_tokens', 'a' must be the layer's tokens [T = 8, K], got 'memref<16x8xbf16>'}}
    moert.grouped_gemm_glu ins(a = %a : memref<16x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>) outs(c = %h : memref<8x16xbf16>)
  } backward {
  }
}

// grouped_gemm_activation_backward: b [G, N, K] with trans_b, else [G, K, N]; pre and c [R, N].

// -----

moert.plan @gemm_act_backward_b_not_transposed attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %pre = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-1] 'b' must be [G = 2, N = 8, K = 8], got 'memref<2x8x16xbf16>'}}
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x8x16xbf16>, pre = %pre : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>, trans_b}
  }
}

// -----

moert.plan @gemm_act_backward_pre_shape attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %pre = moert.alloc "hidden" : memref<8x8xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-1] 'pre' must be [R = 8, N = 16], got 'memref<8x8xbf16>'}}
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, pre = %pre : memref<8x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>, trans_b}
  }
}

// -----

moert.plan @gemm_act_backward_c_shape attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %pre = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<16x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-1] 'c' must be [R = 8, N = 16], got 'memref<16x16xbf16>'}}
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, pre = %pre : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %ghp : memref<16x16xbf16>) {activation = #moe<activation relu>, trans_b}
  }
}

// grouped_gemm_combine: b [G, K, N]; c [R, N]; out [T, N]; row_tokens [R].

// -----

moert.plan @gemm_combine_b_shape attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x8x16xbf16>
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
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'b' must be [G = 2, K = 16, N], got 'memref<2x8x16xbf16>'}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x8x16xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xbf16>, out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_combine_c_shape attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %b2 = moert.argument "b2" input : memref<2x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %eo = moert.alloc "expert_out" : memref<8x16xbf16>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'c' must be [R = 8, N = 8], got 'memref<8x16xbf16>'}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x16xbf16>, out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_combine_out_columns attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %b2 = moert.argument "b2" input : memref<2x8xbf16>
  %out = moert.argument "out" output : memref<4x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'out' must be [T = 4, N = 8], got 'memref<4x16xbf16>'}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xbf16>, out = %out : memref<4x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_combine_row_tokens_rows attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %b2 = moert.argument "b2" input : memref<2x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %rt = moert.alloc "row_tokens" : memref<16xi32>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'row_tokens' must be [R = 8], got 'memref<16xi32>'}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<16xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xbf16>, out = %out : memref<4x8xbf16>)
  } backward {
  }
}
