// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [par-1]: the parallel layout (E / W whole experts per
// rank, or each expert sharded over W / E ranks) and the shapes of
// exchanges, gathers and the routing over shards.

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
  // expected-error @+1 {{[par-1] 6 experts cannot be split evenly over 4 ranks (ranks >= 1 and E % W == 0, or W % E == 0 with each expert sharded over W / E ranks)}}
  %r, %a = moe.gate %x, %wg {capacity = #moe.capacity<dropless>, ranks = 4 : i64} : tensor<8x4xf32>, tensor<4x6xf32> -> !moe.routing<tokens = 8, experts = 6, top_k = 1, capacity = ?>
  return
}

// -----

func.func @par_1_shard_routing_experts(%r: !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = 4>) {
  // expected-error @+1 {{[par-1] result must be routing<tokens = T, experts = E * s, top_k = k * s, capacity = C> = '!moe.routing<tokens = 8, experts = 4, top_k = 2, capacity = 4>' for s = 2 shards, got '!moe.routing<tokens = 8, experts = 2, top_k = 2, capacity = 4>'}}
  %v = moe.shard_routing %r {shards = 2} : !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = 4> -> !moe.routing<tokens = 8, experts = 2, top_k = 2, capacity = 4>
  return
}

// -----

func.func @par_1_shard_routing_capacity(%r: !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?>) {
  // expected-error @+1 {{[par-1] result must be routing<tokens = T, experts = E * s, top_k = k * s, capacity = C>}}
  %v = moe.shard_routing %r {shards = 2} : !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = ?> -> !moe.routing<tokens = 8, experts = 4, top_k = 2, capacity = 4>
  return
}

// -----

func.func @par_1_shard_routing_shards(%r: !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = 4>) {
  // expected-error @+1 {{[par-1] shards must be >= 1, got 0}}
  %v = moe.shard_routing %r {shards = 0} : !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = 4> -> !moe.routing<tokens = 8, experts = 2, top_k = 1, capacity = 4>
  return
}

// -----

func.func @par_1_hidden_shards(%d: tensor<1x8x4xf32>, %w1: tensor<1x4x6xf32>, %w2: tensor<1x6x4xf32>) {
  // expected-error @+1 {{[par-1] hidden_shards must be >= 1, got 0}}
  %y = moe.expert ffn<relu> %d, %w1, %w2 {hidden_shards = 0 : i64} : (tensor<1x8x4xf32>, tensor<1x4x6xf32>, tensor<1x6x4xf32>) -> tensor<1x8x4xf32>
  return
}

// -----

// A group of ranks group_stride apart needs group_stride >= 1.
func.func @par_1_exchange_group_stride(%d: tensor<4x8x4xf32>) {
  // expected-error @+1 {{[par-1] group_stride must be >= 1, got 0}}
  %c = moe.all_to_all dispatch %d {ranks = 2 : i64, group_stride = 0 : i64} : tensor<4x8x4xf32> -> tensor<2x16x4xf32>
  return
}

// -----

func.func @par_1_gather_group_stride(%w: tensor<1x8x12xf32>) {
  // expected-error @+1 {{[par-1] group_stride must be >= 1, got -2}}
  %f = moe.all_gather %w {ranks = 2 : i64, group_stride = -2 : i64} : tensor<1x8x12xf32> -> tensor<2x8x12xf32>
  return
}

// -----

// 2DH runs over all ranks: a grouped exchange (group_stride > 1) is flat.
func.func @par_1_grouped_exchange_2dh(%d: tensor<4x8x4xf32>) {
  // expected-error @+1 {{[a2a-1] a grouped all-to-all (group_stride 2) is flat: ranks_per_node must be 0, got 2}}
  %c = moe.all_to_all dispatch %d {ranks = 2 : i64, group_stride = 2 : i64, ranks_per_node = 2 : i64} : tensor<4x8x4xf32> -> tensor<2x16x4xf32>
  return
}
