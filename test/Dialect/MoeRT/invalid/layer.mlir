// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of #moert.layer: the rules of the runtime's verifyLayerConfig,
// checked when the plan is built. One case per rule.

// [layer]: tokens, model_dim, hidden_dim and experts are > 0.
// expected-error @+1 {{[layer] tokens must be > 0, got 0}}
moert.plan @tokens attributes {layer = #moert.layer<tokens = 0, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// expected-error @+1 {{[layer] model_dim must be > 0, got -4}}
moert.plan @model_dim attributes {layer = #moert.layer<tokens = 8, model_dim = -4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// expected-error @+1 {{[layer] hidden_dim must be > 0, got 0}}
moert.plan @hidden_dim attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 0, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// expected-error @+1 {{[layer] experts must be > 0, got 0}}
moert.plan @experts attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 0, top_k = 0, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// [layer]: tokens and expert weights are f32, bf16 or f16.
// expected-error @+1 {{[layer] dtype must be f32, bf16 or f16, got 'i32'}}
moert.plan @dtype attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = i32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// [gate-2]: 1 <= top_k <= experts.
// expected-error @+1 {{[gate-2] top_k must be in 1..experts (2), got 0}}
moert.plan @top_k_zero attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 0, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// expected-error @+1 {{[gate-2] top_k must be in 1..experts (2), got 3}}
moert.plan @top_k_above_experts attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 3, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// [gate-1]: the gate noise is a finite stddev >= 0.
// expected-error @+1 {{[gate-1] gate_noise must be finite and >= 0, got -1.000000e-01}}
moert.plan @gate_noise attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = -0.1, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// [expert-1]: a gated (SwiGLU) expert has no bias.
// expected-error @+1 {{[expert-1] a gated (SwiGLU) expert has no bias; set bias = false}}
moert.plan @gated_bias attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = gated, activation = silu, dtype = f32, bias = true, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// [cap-1]: a fixed or bounded capacity keeps at least one slot.
// expected-error @+1 {{[cap-1] capacity factor 1.000000e-01 gives capacity 0 (k * int(f * ceil(T/E)) with T = 8, E = 2, k = 1): every token would be dropped; raise the factor}}
moert.plan @capacity_zero attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 0.1>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// [cap-1]: the routing buffers (E * C slots, T * k rows) fit in i32.
// expected-error @+1 {{[cap-1] the capacity bound 1073741824 times experts 2 exceeds the i32 range of the routing buffers; lower the capacity factor or tokens}}
moert.plan @slots_i32 attributes {layer = #moert.layer<tokens = 2147483648, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// expected-error @+1 {{[cap-1] tokens * top_k = 2147483647 * 2 exceeds the i32 range of the routing buffers}}
moert.plan @choices_i32 attributes {layer = #moert.layer<tokens = 2147483647, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 2, capacity = #moe.capacity<fixed 0.001>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// Every field is spelled out: a layer without its seed does not parse.
// expected-error @+1 {{expected ','}}
moert.plan @missing_field attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}

// -----

// A bool field is `true` or `false`.
// expected-error @+2 {{expected 'true' or 'false'}}
// expected-error @+1 {{failed to parse MoeRT_LayerAttr parameter 'bias' which is to be a `bool`}}
moert.plan @bool_field attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = 1, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}
