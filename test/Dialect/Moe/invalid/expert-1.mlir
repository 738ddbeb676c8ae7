// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [expert-1] (expert kinds, activations, weight shapes and types), one case per block.

// expert-1: W1 is [E, d, h].
func.func @expert_1_fc1_shape(%d: tensor<2x5x4xf32>, %w1: tensor<2x3x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] fc1 weight [E, d, h] must have shape [2, 4, 8], got [2, 3, 8]}}
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<2x5x4xf32>, tensor<2x3x8xf32>, tensor<2x8x4xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: W2 is [E, h, d].
func.func @expert_1_fc2_shape(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x4x8xf32>) {
  // expected-error @+1 {{[expert-1] fc2 weight [E, h, d] must have shape [2, 8, 4], got [2, 4, 8]}}
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x4x8xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: an FFN expert has an activation.
func.func @expert_1_ffn_activation(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] an ffn expert needs an activation: ffn<relu>, ffn<gelu> or ffn<silu>}}
  %y = moe.expert ffn %d, %w1, %w2 : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: a gated expert uses silu and takes no activation.
func.func @expert_1_gated_activation(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] a gated expert uses silu (SwiGLU) and takes no activation, got relu}}
  %y = moe.expert gated<relu> %d, %w1, %w2 up(%w1) : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>, tensor<2x4x8xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: a gated expert needs W3.
func.func @expert_1_gated_up(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] a gated expert needs the up projection W3: add up(%w3)}}
  %y = moe.expert gated %d, %w1, %w2 : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: a gated expert has no biases.
func.func @expert_1_gated_bias(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>, %b1: tensor<2x8xf32>, %b2: tensor<2x4xf32>) {
  // expected-error @+1 {{[expert-1] a gated expert takes no biases}}
  %y = moe.expert gated %d, %w1, %w2 up(%w1) bias(%b1, %b2) : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>, tensor<2x4x8xf32>, tensor<2x8xf32>, tensor<2x4xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: an FFN expert has no W3.
func.func @expert_1_ffn_up(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] an ffn expert takes no up projection; use 'gated' for SwiGLU}}
  %y = moe.expert ffn<relu> %d, %w1, %w2 up(%w1) : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>, tensor<2x4x8xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: b1 is [E, h].
func.func @expert_1_bias_shape(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>, %b1: tensor<2x4xf32>, %b2: tensor<2x4xf32>) {
  // expected-error @+1 {{[expert-1] fc1 bias [E, h] must have shape [2, 8], got [2, 4]}}
  %y = moe.expert ffn<gelu> %d, %w1, %w2 bias(%b1, %b2) : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>, tensor<2x4xf32>, tensor<2x4xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: weights have the tokens' element type.
func.func @expert_1_weight_element(%d: tensor<2x5x4xbf16>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xbf16>) {
  // expected-error @+1 {{[expert-1] fc1 weight must have element type 'bf16', got 'f32'}}
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<2x5x4xbf16>, tensor<2x4x8xf32>, tensor<2x8x4xbf16>) -> tensor<2x5x4xbf16>
  return
}

// -----

// expert-1: the result has the input's type.
func.func @expert_1_result(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] result must have the input's type 'tensor<2x5x4xf32>', got 'tensor<2x6x4xf32>'}}
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x6x4xf32>
  return
}

// -----

// expert-1: three activations.
func.func @expert_1_unknown_activation(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] unknown activation 'tanh'; expected relu, gelu or silu}}
  %y = moe.expert ffn<tanh> %d, %w1, %w2 : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: two expert kinds.
func.func @expert_1_unknown_kind(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[expert-1] unknown expert kind 'conv'; expected ffn<relu|gelu|silu> or gated}}
  %y = moe.expert conv %d, %w1, %w2 : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x5x4xf32>
  return
}

// -----

// expert-1: a layer's experts match its router (E of W1 = E of Wg).
func.func @expert_1_layer_experts(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<3x4x8xf32>, %w2: tensor<3x8x4xf32>) {
  // expected-error @+1 {{[expert-1] fc1 weight [E, d, h] must have shape [2, 4, 8], got [3, 4, 8]}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 1, capacity = #moe.capacity<dropless>} : (tensor<8x4xf32>, tensor<4x2xf32>, tensor<3x4x8xf32>, tensor<3x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return
}
