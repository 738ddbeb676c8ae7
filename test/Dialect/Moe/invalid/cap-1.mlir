// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [cap-1] (capacity modes, factors, alignment and values), one case per block.

// cap-1: a fixed capacity is k * int(f * ceil(T/E)).
func.func @cap_1_fixed_value(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[cap-1] fixed capacity #moe.capacity<fixed 1.0> needs routing capacity 50 (k * int(f * ceil(T/E)) with T = 100, E = 4, k = 2), got 49}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>} : tensor<100x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 49>
  return
}

// -----

// cap-1: a dropless capacity is known only after routing.
func.func @cap_1_dropless_static(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[cap-1] the dropless capacity depends on the routing: routing capacity must be '?', got 100}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<100x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 100>
  return
}

// -----

// cap-1: a fixed capacity is static.
func.func @cap_1_fixed_dynamic(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[cap-1] fixed capacity #moe.capacity<fixed 2.0> needs routing capacity 100}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<fixed 2.0>} : tensor<100x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = ?>
  return
}

// -----

// cap-1: the capacity factor is > 0.
func.func @cap_1_factor_positive(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[cap-1] capacity factor of the bounded mode must be finite and > 0, got -1}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<bounded -1.0>} : tensor<100x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = ?>
  return
}

// -----

// cap-1: the dropless mode takes no factor.
func.func @cap_1_dropless_factor(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{expected '>'}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless 1.0>} : tensor<100x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = ?>
  return
}

// -----

// cap-1: three capacity modes.
func.func @cap_1_unknown_mode(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[cap-1] unknown capacity mode 'elastic'; expected fixed, dropless or bounded}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<elastic 1.0>} : tensor<100x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = ?>
  return
}

// -----

// cap-1: the alignment is >= 1.
func.func @cap_1_alignment(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>) {
  // expected-error @+1 {{[cap-1] capacity alignment must be >= 1, got 0}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0, align = 0>} : tensor<100x4xf32>, tensor<4x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
  return
}

// -----

// cap-1: a capacity that overflows int64 is rejected.
func.func @cap_1_overflow(%x: tensor<100x4xf32>, %wg: tensor<4x4xf32>, %w1: tensor<4x4x8xf32>, %w2: tensor<4x8x4xf32>) {
  // expected-error @+1 {{[cap-1] capacity factor 1.000000e+300 gives a capacity that overflows int64}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 2, capacity = #moe.capacity<fixed 1.0e300>} : (tensor<100x4xf32>, tensor<4x4xf32>, tensor<4x4x8xf32>, tensor<4x8x4xf32>) -> (tensor<100x4xf32>, tensor<f32>)
  return
}

// -----

// cap-1: a routing capacity is >= 0 or '?'.
// expected-error @+1 {{[cap-1] capacity must be >= 0 or '?', got -3}}
func.func @cap_1_negative_capacity(%r: !moe.routing<tokens = 8, experts = 4, top_k = 1, capacity = -3>) {
  return
}

// -----

// cap-1: a capacity of 0 would drop every token.
func.func @cap_1_zero_capacity(%x: tensor<8x4xf32>, %wg: tensor<4x8xf32>, %w1: tensor<8x4x8xf32>, %w2: tensor<8x8x4xf32>) {
  // expected-error @+1 {{[cap-1] capacity factor 5.000000e-01 gives capacity 0 (k * int(f * ceil(T/E)) with T = 8, E = 8, k = 1): every token would be dropped; raise the factor}}
  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 1, capacity = #moe.capacity<fixed 0.5>} : (tensor<8x4xf32>, tensor<4x8xf32>, tensor<8x4x8xf32>, tensor<8x8x4xf32>) -> (tensor<8x4xf32>, tensor<f32>)
  return
}
