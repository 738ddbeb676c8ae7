// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [combine-1] (combine shapes and types), one case per block.

!routing = !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
// combine-1: the input is [E, C, d] of the routing.
func.func @combine_1_input(%y: tensor<3x50x16xf32>, %r: !routing) {
  // expected-error @+1 {{[combine-1] input [E, C, d] must have shape [4, 50, 16], got [3, 50, 16]}}
  %o = moe.combine %y, %r : tensor<3x50x16xf32>, !routing -> tensor<100x16xf32>
  return
}

// -----

!routing = !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
// combine-1: the result has the routing's tokens.
func.func @combine_1_tokens(%y: tensor<4x50x16xf32>, %r: !routing) {
  // expected-error @+1 {{[combine-1] result has 64 tokens but the routing has 100}}
  %o = moe.combine %y, %r : tensor<4x50x16xf32>, !routing -> tensor<64x16xf32>
  return
}

// -----

// combine-1: a layer returns the input's type.
func.func @combine_1_layer_result(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{[combine-1] result must have the input's type 'tensor<8x4xf32>', got 'tensor<8x4xf16>'}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 1, capacity = #moe.capacity<dropless>} : (tensor<8x4xf32>, tensor<4x2xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> (tensor<8x4xf16>, tensor<f32>)
  return
}
