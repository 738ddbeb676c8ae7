// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [plan-2]: routing buffers are i32 or f32, and data
// moves between buffers of one element type.

moert.plan @indices_i32 attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
  %indices = moert.alloc "indices" : memref<8x2xf32>
  %locations = moert.alloc "locations" : memref<8x2xi32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<5xi32>
  %d = moert.alloc "dispatched" : memref<16x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'indices' must have element type 'i32', got 'f32'}}
    moert.dispatch ins(x = %x : memref<8x4xf32>, indices = %indices : memref<8x2xf32>, locations = %locations : memref<8x2xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<5xi32>) outs(dispatched = %d : memref<16x4xf32>)
  } backward {
  }
}

// -----

moert.plan @logits_f32 attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xbf16>
  %wg = moert.argument "wg" input : memref<4x2xbf16>
  %logits = moert.alloc "logits" : memref<8x2xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'logits' must have element type 'f32', got 'bf16'}}
    moert.router ins(x = %x : memref<8x4xbf16>, wg = %wg : memref<4x2xbf16>) outs(logits = %logits : memref<8x2xbf16>)
  } backward {
  }
}

// -----

moert.plan @dispatch_element attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xbf16>
  %indices = moert.alloc "indices" : memref<8x2xi32>
  %locations = moert.alloc "locations" : memref<8x2xi32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<5xi32>
  %d = moert.alloc "dispatched" : memref<16x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'dispatched' must have the element type of 'x' ('bf16'), got 'f32'}}
    moert.dispatch ins(x = %x : memref<8x4xbf16>, indices = %indices : memref<8x2xi32>, locations = %locations : memref<8x2xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<5xi32>) outs(dispatched = %d : memref<16x4xf32>)
  } backward {
  }
}

// -----

// x and grad_x are both the token dtype (StepKinds.def: "T,d", Token).
moert.plan @token_element attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xbf16>
  %wg = moert.argument "wg" input : memref<4x2xf32>
  %gl = moert.alloc "grad_logits" : memref<8x2xf32>
  %gx = moert.argument "grad_x" grad_output : memref<8x4xf32>
  %gwg = moert.argument "grad_wg" grad_output : memref<4x2xf32>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-2] 'grad_x' must have the element type of 'x' ('bf16'), got 'f32'}}
    moert.router_backward ins(x = %x : memref<8x4xbf16>, wg = %wg : memref<4x2xf32>, grad_logits = %gl : memref<8x2xf32>) outs(grad_x = %gx : memref<8x4xf32>, grad_wg = %gwg : memref<4x2xf32>)
  }
}

// -----

// The row -> token map of the gather-fused steps is i32.

moert.plan @dispatch_rows_i32 attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %logits = moert.alloc "logits" : memref<8x2xf32>
  %scores = moert.alloc "scores" : memref<8x2xf32>
  %indices = moert.alloc "indices" : memref<8x1xi32>
  %locations = moert.alloc "locations" : memref<8x1xi32>
  %gates = moert.alloc "gates" : memref<8x1xf32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  %rt = moert.alloc "row_tokens" : memref<8xf32>
  moert.variant "v" forward {
    moert.gate ins(logits = %logits : memref<8x2xf32>) outs(scores = %scores : memref<8x2xf32>, indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, gates = %gates : memref<8x1xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 1 : i64}
    // expected-error @+1 {{[plan-2] 'row_tokens' must have element type 'i32', got 'f32'}}
    moert.dispatch_rows ins(indices = %indices : memref<8x1xi32>, locations = %locations : memref<8x1xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<3xi32>) outs(row_tokens = %rt : memref<8xf32>)
  } backward {
  }
}

// -----

moert.plan @gemm_row_tokens_i32 attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<8x8xbf16>
  %w = moert.argument "w1" input : memref<2x8x8xbf16>
  %gw = moert.argument "grad_w1" grad_output : memref<2x8x8xbf16>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi64>
  %c = moert.alloc "c" : memref<8x8xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'row_tokens' must have element type 'i32', got 'i64'}}
    moert.grouped_gemm ins(a = %a : memref<8x8xbf16>, b = %w : memref<2x8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt : memref<8xi64>) outs(c = %c : memref<8x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @wgrad_row_tokens_i32 attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<8x8xbf16>
  %w = moert.argument "w1" input : memref<2x8x8xbf16>
  %gw = moert.argument "grad_w1" grad_output : memref<2x8x8xbf16>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi64>
  %c = moert.alloc "c" : memref<8x8xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'row_tokens' must have element type 'i32', got 'i64'}}
    moert.grouped_gemm_wgrad ins(a = %a : memref<8x8xbf16>, grad_c = %c : memref<8x8xbf16>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>, row_tokens = %rt : memref<8xi64>) outs(grad_b = %gw : memref<2x8x8xbf16>)
  } backward {
  }
}

// -----

// grouped_gemm_glu: every float operand has the element type of a.

moert.plan @gemm_glu_a_float attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xi32>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'a' must have a float element type, got 'i32'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xi32>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_b_element attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'b' must have the element type of 'a' ('bf16'), got 'f16'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_up_element attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'b_up' must have the element type of 'a' ('bf16'), got 'f16'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_c_element attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'c' must have the element type of 'a' ('bf16'), got 'f32'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xf32>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_gate_in_element attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'gate_in' must have the element type of 'a' ('bf16'), got 'f16'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_up_in_element attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'up_in' must have the element type of 'a' ('bf16'), got 'f16'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_row_tokens_i32 attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.argument "x" input : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %rt = moert.alloc "row_tokens" : memref<8xi64>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'row_tokens' must have element type 'i32', got 'i64'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi64>) outs(c = %h : memref<8x16xbf16>)
  } backward {
  }
}

// grouped_gemm_activation_backward computes in one element type.

// -----

moert.plan @gemm_act_backward_pre_f16 attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %pre = moert.alloc "hidden" : memref<8x16xf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-2] 'pre' must have the element type of 'a' ('bf16'), got 'f16'}}
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, pre = %pre : memref<8x16xf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>, trans_b}
  }
}

// -----

moert.plan @gemm_act_backward_c_f32 attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %pre = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xf32>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-2] 'c' must have the element type of 'a' ('bf16'), got 'f32'}}
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, pre = %pre : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %ghp : memref<8x16xf32>) {activation = #moe<activation relu>, trans_b}
  }
}

// grouped_gemm_glu_backward computes in one element type.

// -----

moert.plan @gemm_glu_backward_up_f16 attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gg = moert.alloc "grad_gate_in" : memref<8x16xbf16>
  %gu = moert.alloc "grad_up_in" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-2] 'up_in' must have the element type of 'a' ('bf16'), got 'f16'}}
    moert.grouped_gemm_glu_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %gg : memref<8x16xbf16>, grad_up_in = %gu : memref<8x16xbf16>) {trans_b}
  }
}

// grouped_gemm_combine computes in one element type.

// -----

moert.plan @gemm_combine_c_f16 attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %b2 = moert.argument "b2" input : memref<2x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xf16>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'c' must have the element type of 'a' ('bf16'), got 'f16'}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xf16>, out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_combine_row_tokens_i64 attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %b2 = moert.argument "b2" input : memref<2x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %rt = moert.alloc "row_tokens" : memref<8xi64>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-2] 'row_tokens' must have element type 'i32', got 'i64'}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi64>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xbf16>, out = %out : memref<4x8xbf16>)
  } backward {
  }
}
