// RUN: moe-opt %s --split-input-file --canonicalize | FileCheck %s

// [gate-3] normalizes over k choices only when k > 1: with top-1 the flag is
// dropped.

// CHECK-LABEL: func.func @normalize_top_one
func.func @normalize_top_one(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>)
    -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?> {
  // CHECK: moe.gate
  // CHECK-NOT: normalize
  // CHECK-SAME: -> !moe.routing
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>, normalize}
      : tensor<8x4xf32>, tensor<4x2xf32>
      -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return %r : !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
}

// -----

// With top-2 the flag matters and stays.

// CHECK-LABEL: func.func @normalize_top_two
func.func @normalize_top_two(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>)
    -> !moe.routing<tokens = 8, experts = 2, top_k = 2, capacity = ?> {
  // CHECK: moe.gate {{.+}} {capacity = #moe.capacity<dropless>, normalize}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>, normalize}
      : tensor<8x4xf32>, tensor<4x2xf32>
      -> !moe.routing<tokens = 8, experts = 2, top_k = 2, capacity = ?>
  return %r : !moe.routing<tokens = 8, experts = 2, top_k = 2, capacity = ?>
}

// -----

// [cap-1] bounded: a bound of k * int(f * ceil(T/E)) >= T never binds (no
// expert gets more than T slots), so the layer is dropless. Here T = 100,
// E = 4, k = 2, f = 2: bound = 2 * int(2 * 25) = 100 >= 100.

// CHECK-LABEL: func.func @bounded_covering_all_tokens
func.func @bounded_covering_all_tokens(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>,
    %w1: tensor<4x4x8xf32>, %w2: tensor<4x8x4xf32>) -> tensor<100x4xf32> {
  // CHECK: moe.layer {{.+}}capacity = #moe.capacity<dropless, align = 4>
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<bounded 2.0, align = 4>}
      : (tensor<100x4xf32>, tensor<4x4xf32>, tensor<4x4x8xf32>, tensor<4x8x4xf32>)
      -> (tensor<100x4xf32>, tensor<f32>)
  return %o : tensor<100x4xf32>
}

// -----

// A bound below T can bind and stays: bound = 2 * int(1.9 * 25) = 94 < 100.

// CHECK-LABEL: func.func @bounded_that_binds
func.func @bounded_that_binds(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>)
    -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = ?> {
  // CHECK: moe.gate {{.+}}capacity = #moe.capacity<bounded 1.9>
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<bounded 1.9>}
      : tensor<100x4xf32>, tensor<4x4xf32>
      -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = ?>
  return %r : !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = ?>
}

// -----

// The gate's pattern: bound = 1 * int(4.0 * 2) = 8 >= T = 8.

// CHECK-LABEL: func.func @bounded_gate_is_dropless
func.func @bounded_gate_is_dropless(%x: tensor<8x4xf32>, %wg: tensor<4x4xf32>)
    -> !moe.routing<tokens = 8, experts = 4, top_k = 1, capacity = ?> {
  // CHECK: moe.gate {{.+}}{capacity = #moe.capacity<dropless>}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<bounded 4.0>}
      : tensor<8x4xf32>, tensor<4x4xf32>
      -> !moe.routing<tokens = 8, experts = 4, top_k = 1, capacity = ?>
  return %r : !moe.routing<tokens = 8, experts = 4, top_k = 1, capacity = ?>
}
