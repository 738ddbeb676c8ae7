// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Numbers too large for their fields are errors, not wrap-arounds.

func.func @top_k_too_large(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>, %w1: tensor<2x4x8xf32>, %w2: tensor<2x8x4xf32>) {
  // expected-error @+1 {{integer constant out of range for attribute}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 99999999999999999999, capacity = #moe.capacity<fixed 1.0>} : (tensor<8x4xf32>, tensor<4x2xf32>, tensor<2x4x8xf32>, tensor<2x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return
}

// -----

// expected-error @+1 {{integer value too large}}
func.func @capacity_too_large(%r: !moe.routing<tokens = 8, experts = 4, top_k = 1, capacity = 99999999999999999999>) {
  return
}

// -----

// int(f * spe) = 2^61 fits; times k = 4 it does not.
func.func @capacity_product_overflows(%x: tensor<8x4xf32>, %wg: tensor<4x8xf32>, %w1: tensor<8x4x8xf32>, %w2: tensor<8x8x4xf32>) {
  // expected-error @+1 {{[cap-1] capacity factor 2.305843e+18 gives a capacity that overflows int64}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 4, capacity = #moe.capacity<fixed 2305843009213693952.0>} : (tensor<8x4xf32>, tensor<4x8xf32>, tensor<8x4x8xf32>, tensor<8x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return
}

// -----

func.func @alignment_overflows(%x: tensor<8x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[cap-1] fixed capacity overflows int64}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0, align = 9223372036854775807>} : tensor<8x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 8, experts = 4, top_k = 1, capacity = 0>
  return
}

// -----

func.func @noise_infinite(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{[gate-1] gate noise must be finite and >= 0, got INF}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>, noise = 0x7FF0000000000000 : f64} : tensor<8x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return
}
