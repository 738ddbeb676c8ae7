// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [shape-1] (static, non-empty shapes), one case per block.

// shape-1: token counts and model dims are static.
func.func @shape_1_dynamic_tokens(%x: tensor<?x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{[shape-1] input must have a static shape, got [?, 4]}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<?x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return
}

// -----

// shape-1: a routing has at least one token.
// expected-error @+1 {{[shape-1] routing needs at least one token, got 0}}
func.func @shape_1_no_tokens(%r: !moe.routing<tokens = 0, experts = 2, top_k = 1, capacity = ?>) {
  return
}
