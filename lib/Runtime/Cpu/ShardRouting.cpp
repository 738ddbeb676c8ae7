//===- ShardRouting.cpp - shard_routing and its backward ------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the routing of experts sharded over ranks: each of a
// token's k choices becomes the s shards of its expert (virtual experts
// e * s + q), so dispatch replicates the token to every shard and combine
// sums the shards' partial outputs. Work is split by token.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

namespace flex::cpu {

void shardRouting(const Routing &routing, int64_t shards, int32_t *indices,
                  int32_t *locations, float *gates, int32_t *expertOffsets,
                  int32_t *expertRows) {
  const int64_t T = routing.tokens, k = routing.topK, s = shards;
#pragma omp parallel for schedule(static) if (T * k * s > 16384)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < k; ++i) {
      const int64_t from = t * k + i;
      for (int64_t q = 0; q < s; ++q) {
        const int64_t to = (t * k + i) * s + q;
        indices[to] = static_cast<int32_t>(routing.indices[from] * s + q);
        locations[to] = routing.locations[from];
        gates[to] = routing.gates[from];
      }
    }
  // Every virtual expert keeps the capacity: padded blocks of C rows.
  const int64_t C = *routing.capacity, virtualExperts = routing.experts * s;
  for (int64_t v = 0; v <= virtualExperts; ++v)
    expertOffsets[v] = static_cast<int32_t>(v * C);
  for (int64_t v = 0; v < virtualExperts; ++v)
    expertRows[v] = routing.expertRows[v / s];
}

void shardRoutingBackward(const float *shardGradGates, int64_t tokens,
                          int64_t topK, int64_t shards, float *gradGates) {
#pragma omp parallel for schedule(static) if (tokens * topK * shards > 16384)
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < topK; ++i) {
      float sum = 0.0f;
      for (int64_t q = 0; q < shards; ++q)
        sum += shardGradGates[(t * topK + i) * shards + q];
      gradGates[t * topK + i] = sum;
    }
}

} // namespace flex::cpu
