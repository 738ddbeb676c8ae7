// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Values and attributes of the wrong kind are diagnosed, never crash.

// expected-note @+1 {{prior use here}}
func.func @routing_as_tokens(%r: !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{use of value '%r' expects different type than prior uses}}
  %s, %a = moe.gate %r, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return
}

// -----

// expected-error @+1 {{expected 'experts'}}
func.func @routing_missing_field(%r: !moe.routing<tokens = 8, top_k = 1, capacity = ?>) {
  return
}

// -----

func.func @capacity_not_an_attr(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{attribute 'capacity' failed to satisfy constraint}}
  %r, %a = "moe.gate"(%x, %wg) {capacity = 1.0 : f64} : (tensor<8x4xf32>, tensor<4x2xf32>) -> (!moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>, tensor<f32>)
  return
}

// -----

func.func @capacity_missing(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{requires attribute 'capacity'}}
  %r, %a = "moe.gate"(%x, %wg) : (tensor<8x4xf32>, tensor<4x2xf32>) -> (!moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>, tensor<f32>)
  return
}

// -----

func.func @aux_loss_not_scalar(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{result #1 must be [type-1] 0-D tensor of f32}}
  %r, %a = "moe.gate"(%x, %wg) {capacity = #moe.capacity<dropless>} : (tensor<8x4xf32>, tensor<4x2xf32>) -> (!moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>, tensor<2xf32>)
  return
}

// -----

func.func @expert_segments(%d: tensor<2x5x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{operand count (3) does not match with the total size (4) specified in attribute 'operandSegmentSizes'}}
  %y = "moe.expert"(%d, %w1, %w2) {kind = #moe<expert_kind ffn>, activation = #moe<activation relu>, operandSegmentSizes = array<i32: 1, 1, 1, 1, 0, 0>} : (tensor<2x5x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x5x4xf32>
  return
}
