// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [par-1]: the parallel layout (E / W whole experts per
// rank) and the shapes of exchanges and gathers.

func.func @par_1_uneven_exchange(%d: tensor<6x8x4xf32>) {
  // expected-error @+1 {{[par-1] 6 experts cannot be split evenly over 4 ranks (E % W must be 0)}}
  %c = moe.all_to_all dispatch %d {ranks = 4 : i64} : tensor<6x8x4xf32> -> tensor<1x32x4xf32>
  return
}

// -----

func.func @par_1_chunk_shape(%d: tensor<4x8x4xf32>) {
  // expected-error @+1 {{[par-1] chunk [L, W * C / D, d] must have shape [2, 16, 4], got [2, 8, 4]}}
  %c = moe.all_to_all dispatch %d {ranks = 2 : i64} : tensor<4x8x4xf32> -> tensor<2x8x4xf32>
  return
}

// -----

func.func @par_1_combine_results(%y: tensor<2x16x4xf32>) {
  // expected-error @+1 {{[par-1] a combine all-to-all has one result [E, C, d], got 2}}
  %a, %b = moe.all_to_all combine %y {ranks = 2 : i64} : tensor<2x16x4xf32> -> tensor<4x8x4xf32>, tensor<4x8x4xf32>
  return
}

// -----

func.func @par_1_gather_shape(%w: tensor<2x8x12xf32>) {
  // expected-error @+1 {{[par-1] result [W * L, ...] must have shape [8, 8, 12], got [4, 8, 12]}}
  %f = moe.all_gather %w {ranks = 4 : i64} : tensor<2x8x12xf32> -> tensor<4x8x12xf32>
  return
}

// -----

func.func @par_1_gate_ranks(%x: tensor<8x4xf32>, %wg: tensor<4x6xf32>) {
  // expected-error @+1 {{[par-1] 6 experts cannot be split evenly over 4 ranks (ranks >= 1 and E % W == 0)}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>, ranks = 4 : i64} : tensor<8x4xf32>, tensor<4x6xf32> -> !moe.routing<tokens = 8, experts = 6, top_k = 1, capacity = ?>
  return
}
