// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [gate-1] (the router: shapes, types, noise, routing sizes), one case per block.

// gate-1: the router weight is [d, E] with the input's d.
func.func @gate_1_model_dim(%x: tensor<8x4xf32>, %wg: tensor<5x2xf32>) {
  // expected-error @+1 {{[gate-1] router weight must be [d, E] with d = 4 from the input, got [5, 2]}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<5x2xf32> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return
}

// -----

// gate-1: the router runs in fp32 or in the input's type.
func.func @gate_1_router_type(%x: tensor<8x4xbf16>, %wg: tensor<4x2xf16>) {
  // expected-error @+1 {{[gate-1] router weight must be f32 or the input's element type 'bf16', got 'f16'}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xbf16>, tensor<4x2xf16> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return
}

// -----

// gate-1: gate noise is a standard deviation.
func.func @gate_1_negative_noise(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{[gate-1] gate noise must be finite and >= 0, got -5.000000e-01}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>, noise = -0.5 : f64} : tensor<8x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>
  return
}

// -----

// gate-1: the routing is for the operands' T and E.
func.func @gate_1_routing_sizes(%x: tensor<8x4xf32>, %wg: tensor<4x2xf32>) {
  // expected-error @+1 {{[gate-1] routing must be for T = 8 tokens and E = 2 experts from the operands}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>} : tensor<8x4xf32>, tensor<4x2xf32> -> !moe.routing<tokens = 9, experts = 2, top_k = 1, capacity = ?>
  return
}
