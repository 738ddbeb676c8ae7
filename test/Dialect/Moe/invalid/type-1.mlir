// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [type-1] (element types and ranks of operands), one case per block.

// type-1: tokens must be f32, bf16 or f16.
func.func @type_1_token_element(%x: tensor<8x4xi32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{operand #0 must be [type-1] 2-D tensor of 32-bit float or bfloat16 type or 16-bit float values}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xi32>, tensor<4x2xf32> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return
}

// -----

// type-1: expert buffers are 3-D.
func.func @type_1_expert_rank(%d: tensor<2x4xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{operand #0 must be [type-1] 3-D tensor}}
  %y = moe.expert ffn<relu> %d, %w1, %w2 : (tensor<2x4xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> tensor<2x4xf32>
  return
}
