// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [plan-1]: the operands of a step have the shapes their
// roles need, with sizes that agree between roles.

moert.plan @router_shapes attributes {layer = {}} {
  %x = moert.argument "x" input : memref<8x4xf32>
  %wg = moert.argument "wg" input : memref<5x2xf32>
  %logits = moert.alloc "logits" : memref<8x2xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'wg' must be [d = 4, E], got 'memref<5x2xf32>'}}
    moert.router ins(x = %x : memref<8x4xf32>, wg = %wg : memref<5x2xf32>) outs(logits = %logits : memref<8x2xf32>)
  } backward {
  }
}

// -----

moert.plan @gate_top_k attributes {layer = {}} {
  %logits = moert.alloc "logits" : memref<8x4xf32>
  %scores = moert.alloc "scores" : memref<8x4xf32>
  %indices = moert.alloc "indices" : memref<8x2xi32>
  %locations = moert.alloc "locations" : memref<8x2xi32>
  %gates = moert.alloc "gates" : memref<8x2xf32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<5xi32>
  %rows = moert.alloc "expert_rows" : memref<4xi32>
  %aux = moert.argument "l_aux" output : memref<1xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] top_k = 3 must equal k = 2 of the routing buffers}}
    moert.gate ins(logits = %logits : memref<8x4xf32>) outs(scores = %scores : memref<8x4xf32>, indices = %indices : memref<8x2xi32>, locations = %locations : memref<8x2xi32>, gates = %gates : memref<8x2xf32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<5xi32>, expert_rows = %rows : memref<4xi32>, l_aux = %aux : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, top_k = 3 : i64}
  } backward {
  }
}

// -----

moert.plan @offsets_shape attributes {layer = {}} {
  %x = moert.argument "x" input : memref<8x4xf32>
  %indices = moert.alloc "indices" : memref<8x2xi32>
  %locations = moert.alloc "locations" : memref<8x2xi32>
  %capacity = moert.alloc "capacity" : memref<1xi32>
  %offsets = moert.alloc "expert_offsets" : memref<4xi32>
  %d = moert.alloc "dispatched" : memref<16x5xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'dispatched' must be [R = 16, d = 4], got 'memref<16x5xf32>'}}
    moert.dispatch ins(x = %x : memref<8x4xf32>, indices = %indices : memref<8x2xi32>, locations = %locations : memref<8x2xi32>, capacity = %capacity : memref<1xi32>, expert_offsets = %offsets : memref<4xi32>) outs(dispatched = %d : memref<16x5xf32>)
  } backward {
  }
}

// -----

moert.plan @gemm_inner_dim attributes {layer = {}} {
  %a = moert.alloc "a" : memref<16x4xf32>
  %w = moert.argument "w1" input : memref<2x8x4xf32>
  %offsets = moert.alloc "expert_offsets" : memref<3xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %c = moert.alloc "c" : memref<16x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'b' must be [G = 2, K = 4, N], got 'memref<2x8x4xf32>'}}
    moert.grouped_gemm ins(a = %a : memref<16x4xf32>, b = %w : memref<2x8x4xf32>, expert_offsets = %offsets : memref<3xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %c : memref<16x4xf32>)
  } backward {
  }
}

// -----

moert.plan @gemm_segments attributes {layer = {}} {
  %a = moert.alloc "a" : memref<16x4xf32>
  %w = moert.argument "w1" input : memref<2x4x8xf32>
  %offsets = moert.alloc "expert_offsets" : memref<2xi32>
  %rows = moert.alloc "expert_rows" : memref<2xi32>
  %c = moert.alloc "c" : memref<16x8xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-1] 'expert_offsets' must be [G+1 = 3], got 'memref<2xi32>'}}
    moert.grouped_gemm ins(a = %a : memref<16x4xf32>, b = %w : memref<2x4x8xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<2xi32>) outs(c = %c : memref<16x8xf32>)
  } backward {
  }
}
