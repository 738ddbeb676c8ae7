// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [size-1] (element counts that fit in int64), one case per block.

// size-1: element counts fit in int64.
func.func @size_1_overflow(%x: tensor<4611686018427387904x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{[size-1] input of shape [4611686018427387904, 4] has more elements than int64 can count}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<4611686018427387904x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 4611686018427387904, experts = 2, top_k = 1, capacity = ?>
  return
}
