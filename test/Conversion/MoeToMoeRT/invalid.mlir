// RUN: moe-opt %s --split-input-file --convert-moe-to-moert --verify-diagnostics

// [plan-3]: what a layer function must be to become a plan.

func.func @not_expanded(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>) {
  // expected-error @+1 {{[plan-3] expand moe.layer first (--moe-expand-layer)}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 1, capacity = #moe.capacity<dropless>} : (tensor<8x4xf32>, tensor<4x2xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return %o, %a : tensor<8x4xf32>, tensor<f32>
}

// -----

!r = !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
func.func @two_gates(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) -> !r {
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<4x2xf32> -> !r
  // expected-error @+1 {{[plan-3] a layer function holds one layer; this one has a second moe.gate}}
  %r2, %a2 = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<4x2xf32> -> !r
  return %r : !r
}

// -----

!r = !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
// expected-error @+1 {{[plan-3] a layer function needs one moe.gate, moe.dispatch, moe.expert and moe.combine}}
func.func @gate_only(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) -> !r {
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<4x2xf32> -> !r
  return %r : !r
}

// -----

!r = !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
func.func @foreign_op(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>) {
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<4x2xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<8x4xf32>, !r -> tensor<2x?x4xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<2x?x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x?x4xf32>
  %o = moe.combine %y, %r : tensor<2x?x4xf32>, !r -> tensor<8x4xf32>
  // expected-error @+1 {{[plan-3] is not part of a layer}}
  %c:2 = func.call @foreign_op(%x, %wg, %w1, %w2) : (tensor<8x4xf32>, tensor<4x2xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return %o, %a : tensor<8x4xf32>, tensor<f32>
}

// -----

!r = !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
func.func @returns_buffer(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<2x?x4xf32>) {
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<4x2xf32> -> !r
  %d = moe.dispatch %x, %r : tensor<8x4xf32>, !r -> tensor<2x?x4xf32>
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<2x?x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x?x4xf32>
  %o = moe.combine %y, %r : tensor<2x?x4xf32>, !r -> tensor<8x4xf32>
  // expected-error @+1 {{[plan-3] a layer function returns the combined output and the aux loss only}}
  return %o, %d : tensor<8x4xf32>, tensor<2x?x4xf32>
}
