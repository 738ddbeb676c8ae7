// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [gate-2] (1 <= top_k <= E), one case per block.

// gate-2: 1 <= top_k <= E in the routing type.
// expected-error @+1 {{[gate-2] top_k must be in [1, experts = 4], got 5}}
func.func @gate_2_routing_top_k(%r: !moe.routing<tokens = 8, experts = 4, top_k = 5, capacity = ?>) {
  return
}

// -----

// gate-2: 1 <= top_k <= E in a layer.
func.func @gate_2_layer_top_k(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[gate-2] top_k must be in [1, experts = 2], got 3}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 3, capacity = #moe.capacity<fixed 1.0>} : (tensor<8x4xf32>, tensor<4x2xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return
}

// -----

// gate-2: top_k = 0 chooses nothing.
func.func @gate_2_layer_top_zero(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[gate-2] top_k must be in [1, experts = 2], got 0}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 0, capacity = #moe.capacity<fixed 1.0>} : (tensor<8x4xf32>, tensor<4x2xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return
}
