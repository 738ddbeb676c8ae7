// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [plan-3]: the structure of a plan and of its steps.

moert.plan @unknown_role attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] unknown ins role 'y'; expected one of x, wg}}
    moert.router ins(y = %x : memref<8x4xf32>) outs()
  } backward {
  }
}

// -----

moert.plan @missing_role attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
  %wg = moert.argument "wg" input : memref<4x2xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] missing role 'logits'}}
    moert.router ins(x = %x : memref<8x4xf32>, wg = %wg : memref<4x2xf32>) outs()
  } backward {
  }
}

// -----

moert.plan @role_twice attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] role 'x' given twice}}
    moert.router ins(x = %x : memref<8x4xf32>, x = %x : memref<8x4xf32>) outs()
  } backward {
  }
}

// -----

moert.plan @duplicate_name attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
  // expected-error @+1 {{[plan-3] buffer name 'x' is defined twice in the plan}}
  %y = moert.alloc "x" : memref<8x4xf32>
}

// -----

moert.plan @alignment attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>, workspace_alignment = 100 : i64} {
  // expected-error @-1 {{[plan-3] workspace alignment must be a power of two, got 100}}
}

// -----

// expected-error @+1 {{'moert.alloc' op expects parent op 'moert.plan'}}
%a = moert.alloc "a" : memref<4xf32>

// -----

moert.plan @shard_routing_shards attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %vg = moert.alloc "shard_grad_gates" : memref<8x1xf32>
  %g = moert.alloc "grad_gates" : memref<8x1xf32>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-3] shards must be >= 1, got 0}}
    moert.shard_routing_backward ins(grad_gates = %vg : memref<8x1xf32>) outs(grad_gates = %g : memref<8x1xf32>) {shards = 0 : i64}
  }
}

// -----

moert.plan @bias_scale attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "a" : memref<8x4xf32>
  %b = moert.alloc "b" : memref<2x4x3xf32>
  %bias = moert.alloc "bias" : memref<2x3xf32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %c = moert.alloc "c" : memref<8x3xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] bias_scale must be finite and > 0, got -5.000000e-01}}
    moert.grouped_gemm ins(a = %a : memref<8x4xf32>, b = %b : memref<2x4x3xf32>, bias = %bias : memref<2x3xf32>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %c : memref<8x3xf32>) {bias_scale = -5.000000e-01 : f64}
  } backward {
  }
}

// -----

// group_size 0 (all ranks) or >= 1, group_stride >= 1, and no stride without
// a group size (PlanFormat.md, "Groups of ranks").
moert.plan @group_stride_zero attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w = moert.argument "w1" input : memref<1x8x6xf32>
  %f = moert.alloc "full_w1" : memref<2x8x6xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] group_size must be 0 (all ranks) or >= 1 with group_stride >= 1, got group_size = 2, group_stride = 0}}
    moert.all_gather ins(input = %w : memref<1x8x6xf32>) outs(output = %f : memref<2x8x6xf32>) {group_size = 2 : i64, group_stride = 0 : i64}
  } backward {
  }
}

// -----

moert.plan @group_size_negative attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %g = moert.alloc "full_grad_w1" : memref<2x8x6xf32>
  %w = moert.argument "grad_w1" output : memref<1x8x6xf32>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-3] group_size must be 0 (all ranks) or >= 1 with group_stride >= 1, got group_size = -2, group_stride = 1}}
    moert.reduce_scatter ins(input = %g : memref<2x8x6xf32>) outs(output = %w : memref<1x8x6xf32>) {group_size = -2 : i64}
  }
}

// -----

moert.plan @group_stride_without_size attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.alloc "send" : memref<32x8xf32>
  %c = moert.alloc "capacity" : memref<1xi32>
  %y = moert.alloc "recv" : memref<32x8xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] group_size must be 0 (all ranks) or >= 1 with group_stride >= 1, got group_size = 0, group_stride = 2}}
    moert.all_to_all ins(input = %x : memref<32x8xf32>, capacity = %c : memref<1xi32>) outs(output = %y : memref<32x8xf32>) {chunk = 0 : i64, chunks = 1 : i64, direction = #moert<direction dispatch>, group_stride = 2 : i64}
  } backward {
  }
}

// -----

// grouped_gemm_glu keeps both rounded products for glu_backward, or neither.

moert.plan @gemm_glu_gate_in_alone attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] 'gate_in' and 'up_in' are given both or neither, got only 'gate_in'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, gate_in = %gate : memref<8x16xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_glu_up_in_alone attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "dispatched" : memref<8x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %w3 = moert.argument "w3" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] 'gate_in' and 'up_in' are given both or neither, got only 'up_in'}}
    moert.grouped_gemm_glu ins(a = %a : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, b_up = %w3 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>)
  } backward {
  }
}

// grouped_gemm_activation_backward writes c apart from what it reads.

// -----

moert.plan @gemm_act_backward_c_is_pre attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %pre = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-3] 'c' must not be its 'pre': the step writes c apart from what it reads}}
    moert.grouped_gemm_activation_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, pre = %pre : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %pre : memref<8x16xbf16>) {activation = #moe<activation relu>, trans_b}
  }
}

// grouped_gemm_glu_backward writes its outputs apart from what it reads, and
// each apart from the other.

// -----

moert.plan @gemm_glu_backward_over_gate attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gg = moert.alloc "grad_gate_in" : memref<8x16xbf16>
  %gu = moert.alloc "grad_up_in" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-3] 'grad_gate_in' must not be its 'gate_in': the step writes its outputs apart from what it reads}}
    moert.grouped_gemm_glu_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %gate : memref<8x16xbf16>, grad_up_in = %gu : memref<8x16xbf16>) {trans_b}
  }
}

// -----

moert.plan @gemm_glu_backward_one_output attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gg = moert.alloc "grad_gate_in" : memref<8x16xbf16>
  %gu = moert.alloc "grad_up_in" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    // expected-error @+1 {{[plan-3] 'grad_gate_in' and 'grad_up_in' must be two buffers}}
    moert.grouped_gemm_glu_backward ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %gu : memref<8x16xbf16>, grad_up_in = %gu : memref<8x16xbf16>) {trans_b}
  }
}

// grouped_gemm_combine writes its outputs apart from what it reads.

// -----

moert.plan @gemm_combine_c_is_a attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %w2 = moert.argument "w2" input : memref<2x8x8xbf16>
  %b2 = moert.argument "b2" input : memref<2x8xbf16>
  %out = moert.argument "out" output : memref<4x8xbf16>
  %h = moert.alloc "hidden" : memref<8x8xbf16>
  %eo = moert.alloc "expert_out" : memref<8x8xbf16>
  %rt = moert.alloc "row_tokens" : memref<8xi32>
  %i = moert.alloc "indices" : memref<4x2xi32>
  %l = moert.alloc "locations" : memref<4x2xi32>
  %g = moert.alloc "gates" : memref<4x2xf32>
  %cap = moert.alloc "capacity" : memref<1xi32>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] 'c' must not be its 'a': the step writes its outputs apart from what it reads}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x8xbf16>, b = %w2 : memref<2x8x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %h : memref<8x8xbf16>, out = %out : memref<4x8xbf16>)
  } backward {
  }
}

// -----

moert.plan @gemm_combine_bias_scale attributes {layer = #moert.layer<tokens = 4, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 2, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
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
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] bias_scale must be finite and > 0, got -1.000000e+00}}
    moert.grouped_gemm_combine ins(a = %h : memref<8x16xbf16>, b = %w2 : memref<2x16x8xbf16>, bias = %b2 : memref<2x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>, row_tokens = %rt : memref<8xi32>, indices = %i : memref<4x2xi32>, locations = %l : memref<4x2xi32>, gates = %g : memref<4x2xf32>, capacity = %cap : memref<1xi32>) outs(c = %eo : memref<8x8xbf16>, out = %out : memref<4x8xbf16>) {bias_scale = -1.0 : f64}
  } backward {
  }
}
