//===- ShardRouting.cu - shard_routing and its backward on the GPU --------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the routing of experts sharded over ranks on the GPU,
// as lib/Runtime/Cpu/ShardRouting.cpp: each of a token's k choices becomes
// the s shards of its expert (virtual experts e * s + q), copied as they are
// (a dropped choice stays dropped in every shard: its location is kept and
// compared with the same C later). The capacity is read on the device, so
// the step never waits for the host. The backward sums each choice's s gate
// gradients in shard order, in fp32, as the CPU.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"

namespace flex::cuda {

namespace {

constexpr int kThreads = 256;

/// Thread i writes output slot i (of T * k * s) and, for i <= E * s, the
/// virtual expert i's offset and rows.
__global__ void shardRoutingKernel(Routing routing, int64_t shards,
                                   int64_t slots, int64_t virtualExperts,
                                   int32_t *__restrict__ indices,
                                   int32_t *__restrict__ locations,
                                   float *__restrict__ gates,
                                   int32_t *__restrict__ expertOffsets,
                                   int32_t *__restrict__ expertRows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t work = slots > virtualExperts + 1 ? slots : virtualExperts + 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < work; i += stride) {
    if (i < slots) {
      const int64_t from = i / shards, q = i - from * shards;
      indices[i] = static_cast<int32_t>(
          static_cast<int64_t>(routing.indices[from]) * shards + q);
      locations[i] = routing.locations[from];
      gates[i] = routing.gates[from];
    }
    // Every virtual expert keeps the capacity: padded blocks of C rows.
    if (i <= virtualExperts)
      expertOffsets[i] = static_cast<int32_t>(i * *routing.capacity);
    if (i < virtualExperts)
      expertRows[i] = routing.expertRows[i / shards];
  }
}

__global__ void shardRoutingBackwardKernel(const float *__restrict__ shardGrad,
                                           int64_t choices, int64_t shards,
                                           float *__restrict__ gradGates) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < choices; i += stride) {
    float sum = 0.0f;
    for (int64_t q = 0; q < shards; ++q)
      sum = __fadd_rn(sum, shardGrad[i * shards + q]);
    gradGates[i] = sum;
  }
}

Status checkShards(int64_t shards, const char *what) {
  if (shards >= 1)
    return Status::ok();
  return Status(StatusCode::InvalidArgument,
                std::string(what) + ": shards is " + std::to_string(shards) +
                    "; it must be at least 1 (s = W / E)");
}

} // namespace

Status shardRouting(KernelContext &ctx, const Routing &routing, int64_t shards,
                    int32_t *indices, int32_t *locations, float *gates,
                    int32_t *expertOffsets, int32_t *expertRows) {
  if (Status s = checkShards(shards, "shard_routing"); !s)
    return s;
  const int64_t slots = routing.tokens * routing.topK * shards;
  const int64_t virtualExperts = routing.experts * shards;
  const int64_t work = std::max(slots, virtualExperts + 1);
  shardRoutingKernel<<<detail::gridFor(work, kThreads), kThreads, 0,
                       ctx.stream()>>>(routing, shards, slots, virtualExperts,
                                       indices, locations, gates,
                                       expertOffsets, expertRows);
  return checkLaunch("shard_routing kernel");
}

Status shardRoutingBackward(KernelContext &ctx, const float *shardGradGates,
                            int64_t tokens, int64_t topK, int64_t shards,
                            float *gradGates) {
  if (Status s = checkShards(shards, "shard_routing_backward"); !s)
    return s;
  const int64_t choices = tokens * topK;
  if (choices == 0)
    return Status::ok();
  shardRoutingBackwardKernel<<<detail::gridFor(choices, kThreads), kThreads, 0,
                               ctx.stream()>>>(shardGradGates, choices, shards,
                                               gradGates);
  return checkLaunch("shard_routing_backward kernel");
}

} // namespace flex::cuda
