// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [size-1] (element counts that fit in int64), one case per block.

// size-1: element counts fit in int64.
func.func @size_1_overflow(%x: tensor<4611686018427387904x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{[size-1] input of shape [4611686018427387904, 4] has more elements than int64 can count}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<4611686018427387904x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 4611686018427387904, experts = 2, top_k = 1, capacity = ?>
  return
}

// -----

// size-1: the routing buffers are i32, so T * k must fit.
func.func @size_1_choices(%x: tensor<2147483647x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{[size-1] tokens * top_k = 2147483647 * 2 exceeds the i32 range of the routing buffers}}
  %r, %a = moe.gate %x, %wg {top_k = 2, capacity = #moe.capacity<dropless>} : tensor<2147483647x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 2147483647, experts = 2, top_k = 2, capacity = ?>
  return
}

// -----

// size-1: and so must E * C padded slots.
func.func @size_1_slots(%x: tensor<1073741824x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[size-1] experts * shards * capacity = 4 * 1 * 1073741824 exceeds the i32 range of the routing buffers}}
  %r, %a = moe.gate %x, %wg {top_k = 1, capacity = #moe.capacity<fixed 4.0>} : tensor<1073741824x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 1073741824, experts = 4, top_k = 1, capacity = 1073741824>
  return
}

// -----

// size-1: and E * s * C once experts are sharded over s = W / E ranks.
func.func @size_1_shard_slots(%x: tensor<536870912x4xf32>, %wg: tensor<4x1xf32>) {
  // expected-error @+1 {{[size-1] experts * shards * capacity = 1 * 4 * 536870912 exceeds the i32 range of the routing buffers}}
  %r, %a = moe.gate %x, %wg {top_k = 1, ranks = 4, capacity = #moe.capacity<fixed 1.0>} : tensor<536870912x4xf32>, tensor<4x1xf32> -> !moe.routing<tokens = 536870912, experts = 1, top_k = 1, capacity = 536870912>
  return
}
