//===- Gate.cu - gate and gate_backward on the GPU ------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the routing of [gate-1..3], [loc-1], [cap-1] and
// [loss-1] without a host round trip:
//  1. one thread per token: noise, softmax, top-k, gates, the priority key
//     (the same fp32 operations in the same order as the CPU kernel, expf as
//     glibc computes it, explicit roundings where nvcc would fuse a
//     multiply-add; top-k ranked by the noisy logits), so scores and indices
//     match the CPU bit for bit;
//  2. batch-prioritized order: a stable CUB radix sort of the tokens by
//     descending priority (stable = std::stable_sort's order);
//  3. locations: the k*T (choice, token) pairs in [loc-1] order are cut into
//     chunks; per chunk a histogram, a scan over chunks per expert, then per
//     chunk the rank of each pair among the earlier pairs of its expert
//     (warp match + per-warp counts), which is exact integer arithmetic;
//  4. one block: counts, [cap-1] capacity, rows and offsets, l_aux.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <limits>

namespace flex::cuda {

namespace {

constexpr int kLocationChunk = 1024;
constexpr int kLocationThreads = 256;
/// The location kernel keeps 9 counters per expert in shared memory.
constexpr int64_t kMaxGateExperts = 1024;

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// The CPU gateNoiseSample (Cpu/CpuKernels.h), operation for operation.
__device__ double noiseSample(uint64_t seed, int64_t token, int64_t expert) {
  uint64_t cell = static_cast<uint64_t>(token) * 0x9E3779B97F4A7C15ull +
                  static_cast<uint64_t>(expert);
  uint64_t h = splitmix64(seed ^ splitmix64(cell));
  constexpr double kTwoPow53 = 0x1p-53;
  double u1 = __dmul_rn(static_cast<double>(splitmix64(h) >> 11) + 0.5,
                        kTwoPow53);
  double u2 = __dmul_rn(static_cast<double>(splitmix64(h + 1) >> 11) + 0.5,
                        kTwoPow53);
  return __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))),
                   cos(__dmul_rn(6.283185307179586476925, u2)));
}

/// 2^(i/32) as doubles, minus i << 47: the table of the exp2f/expf
/// algorithm of ARM's optimized-routines that glibc ships as expf.
__constant__ uint64_t kExp2Table[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f,
    0x3fef9301d0125b51, 0x3fef72b83c7d517b, 0x3fef54873168b9aa,
    0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74,
    0x3feea11473eb0187, 0x3feea589994cce13, 0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c,
    0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540};

/// expf as the CPU kernel's std::exp computes it: glibc's expf in its FMA
/// build (x86-64 hosts with FMA select it), operation for operation. It is
/// not correctly rounded (about 1 result in 10^6 differs from exp in fp64
/// rounded once), and the gate needs the CPU's bits: the batch-prioritized
/// order compares scores across tokens. Checked on the host against glibc on
/// 5 * 10^7 arguments: no difference.
__device__ float glibcExpf(float x) {
  const uint32_t bits = __float_as_uint(x);
  const uint32_t abstop = (bits >> 20) & 0x7ff;
  if (abstop >= (__float_as_uint(88.0f) >> 20)) {
    if (bits == __float_as_uint(-INFINITY))
      return 0.0f;
    if (abstop >= (__float_as_uint(INFINITY) >> 20))
      return x + x;
    if (x > 0x1.62e42ep6f)
      return INFINITY;
    if (x < -0x1.9fe368p6f)
      return 0.0f;
  }
  constexpr double kInvLn2N = 0x1.71547652b82fep+0 * 32, kShift = 0x1.8p+52;
  constexpr double c0 = 0x1.c6af84b912394p-5 / 32 / 32 / 32;
  constexpr double c1 = 0x1.ebfce50fac4f3p-3 / 32 / 32;
  constexpr double c2 = 0x1.62e42ff0c52d6p-1 / 32;
  const double xd = static_cast<double>(x);
  double kd = __fma_rn(kInvLn2N, xd, kShift);
  const uint64_t ki = static_cast<uint64_t>(__double_as_longlong(kd));
  kd = __dsub_rn(kd, kShift);
  const double r = __fma_rn(kInvLn2N, xd, -kd);
  const double s = __longlong_as_double(
      static_cast<long long>(kExp2Table[ki % 32] + (ki << 47)));
  const double z = __fma_rn(c0, r, c1);
  const double r2 = __dmul_rn(r, r);
  double y = __fma_rn(c2, r, 1.0);
  y = __fma_rn(z, r2, y);
  return static_cast<float>(__dmul_rn(y, s));
}

/// ranksAbove of the CPU kernel: NaN loses to every number.
__device__ __forceinline__ bool ranksAbove(float a, float b) {
  if (isnan(a))
    return false;
  return isnan(b) || a > b;
}

__global__ void gateTokensKernel(const float *__restrict__ logits,
                                 int64_t tokens, int32_t experts, int32_t k,
                                 bool normalize, double noiseScale,
                                 uint64_t seed, float *__restrict__ scores,
                                 int32_t *__restrict__ indices,
                                 float *__restrict__ gates,
                                 float *__restrict__ priority,
                                 float *__restrict__ noisyLogits) {
  int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens)
    return;
  const float *logitRow = logits + t * experts;
  float *scoreRow = scores + t * experts;
  float *noisy = noisyLogits + t * experts;
  float maxLogit = -INFINITY;
  for (int32_t e = 0; e < experts; ++e) {
    float value = logitRow[e];
    if (noiseScale != 0.0)
      value = static_cast<float>(__dadd_rn(
          static_cast<double>(value),
          __dmul_rn(noiseScale, noiseSample(seed, t, e))));
    noisy[e] = value;
    if (value > maxLogit)
      maxLogit = value;
  }
  bool anyNaN = false;
  float sum = 0.0f;
  for (int32_t e = 0; e < experts; ++e) {
    float value = noisy[e];
    anyNaN |= isnan(value);
    value = glibcExpf(__fsub_rn(value, maxLogit));
    scoreRow[e] = value;
    sum = __fadd_rn(sum, value);
  }
  float inverse = anyNaN ? __int_as_float(0x7fc00000) : __fdiv_rn(1.0f, sum);
  for (int32_t e = 0; e < experts; ++e)
    scoreRow[e] = __fmul_rn(scoreRow[e], inverse);

  // [gate-2] ranks by the noisy logits, as the CPU kernel (scores of
  // far-behind experts underflow to equal zeros; logits do not).
  int32_t *indexRow = indices + t * k;
  float *gateRow = gates + t * k;
  float gateSum = 0.0f;
  for (int32_t j = 0; j < k; ++j) {
    int32_t best = -1;
    float bestLogit = 0.0f;
    for (int32_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int32_t i = 0; i < j; ++i)
        taken |= indexRow[i] == e;
      if (taken)
        continue;
      float logit = noisy[e];
      if (best < 0 || ranksAbove(logit, bestLogit)) {
        best = e;
        bestLogit = logit;
      }
    }
    indexRow[j] = best;
    gateRow[j] = scoreRow[best];
    gateSum = __fadd_rn(gateSum, gateRow[j]);
  }
  if (normalize) {
    // std::max(sum, eps) keeps a NaN sum.
    float denominator =
        gateSum < kGateNormalizeEps ? kGateNormalizeEps : gateSum;
    for (int32_t j = 0; j < k; ++j)
      gateRow[j] = __fdiv_rn(gateRow[j], denominator);
  }
  if (priority) {
    float top = scoreRow[indexRow[0]];
    priority[t] = isnan(top) ? -INFINITY : top;
  }
}

/// [loss-1] partial sums: mean scores in fp64 and first-choice counts.
__global__ void gateLossKernel(const float *__restrict__ scores,
                               const int32_t *__restrict__ indices,
                               int64_t tokens, int32_t experts, int32_t k,
                               double *__restrict__ scoreSums,
                               int32_t *__restrict__ firstChoices) {
  extern __shared__ double sharedSums[];
  for (int32_t e = threadIdx.x; e < experts; e += blockDim.x)
    sharedSums[e] = 0.0;
  __syncthreads();
  int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < tokens) {
    for (int32_t e = 0; e < experts; ++e)
      atomicAdd(&sharedSums[e], static_cast<double>(scores[t * experts + e]));
    atomicAdd(&firstChoices[indices[t * k]], 1);
  }
  __syncthreads();
  for (int32_t e = threadIdx.x; e < experts; e += blockDim.x)
    atomicAdd(&scoreSums[e], sharedSums[e]);
}

__global__ void iotaKernel(int32_t *values, int64_t count) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < count)
    values[i] = static_cast<int32_t>(i);
}

/// The expert of pair s of the [loc-1] sequence (choice j = s / T, the
/// p-th token of the order), and where its location goes.
struct SlotSequence {
  const int32_t *indices;
  const int32_t *order; ///< null = token order
  int64_t tokens;
  int32_t k;

  __device__ __forceinline__ int64_t slotOf(int64_t s) const {
    int64_t j = s / tokens, p = s - j * tokens;
    int64_t t = order ? order[p] : p;
    return t * k + j;
  }
};

__global__ void chunkCountKernel(SlotSequence sequence, int64_t length,
                                 int32_t experts,
                                 int32_t *__restrict__ chunkCounts) {
  extern __shared__ int32_t histogram[];
  for (int32_t e = threadIdx.x; e < experts; e += blockDim.x)
    histogram[e] = 0;
  __syncthreads();
  int64_t begin = static_cast<int64_t>(blockIdx.x) * kLocationChunk;
  for (int64_t s = begin + threadIdx.x;
       s < begin + kLocationChunk && s < length; s += blockDim.x)
    atomicAdd(&histogram[sequence.indices[sequence.slotOf(s)]], 1);
  __syncthreads();
  for (int32_t e = threadIdx.x; e < experts; e += blockDim.x)
    chunkCounts[static_cast<int64_t>(blockIdx.x) * experts + e] = histogram[e];
}

struct CapacityParams {
  CapacityMode mode;
  double factor;
  int64_t tokens;
  int32_t experts;
  int32_t k;
  int64_t alignment;
  bool padded;
};

/// One block: exclusive scan of the chunk counts per expert, then [cap-1],
/// rows, offsets and l_aux.
__global__ void gateScanKernel(int32_t *__restrict__ chunkCounts,
                               int64_t chunks, CapacityParams p,
                               const double *__restrict__ scoreSums,
                               const int32_t *__restrict__ firstChoices,
                               int32_t *__restrict__ counts,
                               int32_t *__restrict__ capacity,
                               int32_t *__restrict__ expertOffsets,
                               int32_t *__restrict__ expertRows,
                               float *__restrict__ lAux) {
  __shared__ int32_t maxCount;
  if (threadIdx.x == 0)
    maxCount = 0;
  __syncthreads();
  for (int32_t e = threadIdx.x; e < p.experts; e += blockDim.x) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t &cell = chunkCounts[c * p.experts + e];
      int32_t count = cell;
      cell = running;
      running += count;
    }
    counts[e] = running;
    atomicMax(&maxCount, running);
  }
  __syncthreads();
  if (threadIdx.x != 0)
    return;
  // [cap-1]: the host's arithmetic (Core/Capacity.h), run here.
  int64_t cap = computeCapacity(p.mode, p.factor, p.tokens, p.experts, p.k,
                                maxCount, p.alignment);
  *capacity = static_cast<int32_t>(min(cap, int64_t{INT32_MAX}));
  int64_t offset = 0;
  for (int32_t e = 0; e < p.experts; ++e) {
    int64_t rows = min(int64_t{counts[e]}, cap);
    expertRows[e] = static_cast<int32_t>(rows);
    expertOffsets[e] = static_cast<int32_t>(p.padded ? e * cap : offset);
    offset += rows;
  }
  expertOffsets[p.experts] =
      static_cast<int32_t>(p.padded ? p.experts * cap : offset);
  double loss = 0.0;
  double tokenCount = static_cast<double>(p.tokens);
  for (int32_t e = 0; e < p.experts; ++e)
    loss = __dadd_rn(loss, __dmul_rn(scoreSums[e] / tokenCount,
                                     static_cast<double>(firstChoices[e]) /
                                         tokenCount));
  *lAux = p.tokens > 0
              ? static_cast<float>(static_cast<double>(p.experts) * loss)
              : 0.0f;
}

__global__ void __launch_bounds__(kLocationThreads)
    locationKernel(SlotSequence sequence, int64_t length, int32_t experts,
                   const int32_t *__restrict__ chunkBases,
                   int32_t *__restrict__ locations) {
  constexpr int kWarps = kLocationThreads / 32;
  extern __shared__ int32_t shared[];
  int32_t *running = shared;                // [experts]
  int32_t *warpCounts = shared + experts;   // [kWarps][experts]
  for (int32_t e = threadIdx.x; e < experts; e += blockDim.x) {
    running[e] = chunkBases[static_cast<int64_t>(blockIdx.x) * experts + e];
    for (int w = 0; w < kWarps; ++w)
      warpCounts[w * experts + e] = 0;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lowerLanes = (1u << lane) - 1u;
  int64_t begin = static_cast<int64_t>(blockIdx.x) * kLocationChunk;
  int64_t end = min(begin + kLocationChunk, length);
  for (int64_t round = begin; round < end; round += kLocationThreads) {
    int64_t s = round + threadIdx.x;
    int64_t slot = s < end ? sequence.slotOf(s) : -1;
    int32_t expert = slot >= 0 ? sequence.indices[slot] : -1;
    unsigned same = __match_any_sync(0xffffffffu, expert);
    int32_t rankInWarp = __popc(same & lowerLanes);
    bool leader = rankInWarp == 0;
    if (leader && expert >= 0)
      warpCounts[warp * experts + expert] = __popc(same);
    __syncthreads();
    if (expert >= 0) {
      int32_t before = running[expert];
      for (int w = 0; w < warp; ++w)
        before += warpCounts[w * experts + expert];
      locations[slot] = before + rankInWarp;
    }
    __syncthreads();
    if (leader && expert >= 0) {
      atomicAdd(&running[expert], __popc(same));
      warpCounts[warp * experts + expert] = 0;
    }
    __syncthreads();
  }
}

} // namespace

Status gate(KernelContext &ctx, const float *logits, int64_t tokens,
            int64_t experts, const GateAttrs &attrs, const GateOutputs &out) {
  if (experts <= 0)
    return Status::ok();
  if (experts > kMaxGateExperts)
    return Status(StatusCode::Unavailable,
                  "the CUDA gate supports up to " +
                      std::to_string(kMaxGateExperts) + " experts; got " +
                      std::to_string(experts));
  ++ctx.generation;
  cudaStream_t stream = ctx.stream();
  const int32_t E = static_cast<int32_t>(experts);
  const int32_t k =
      static_cast<int32_t>(std::clamp<int64_t>(attrs.topK, 1, experts));
  const int64_t length = tokens * k;
  const int64_t chunks = (length + kLocationChunk - 1) / kLocationChunk;

  // Scratch: [scoreSums E f64][firstChoices E][counts E][chunk counts]
  // [priority T, keys T][order T, sorted T][CUB temp].
  auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  int64_t sortTempBytes = 0;
  if (attrs.batchPrioritized && tokens > 0) {
    size_t bytes = 0;
    if (Status s = checkCuda(
            cub::DeviceRadixSort::SortPairsDescending(
                nullptr, bytes, static_cast<const float *>(nullptr),
                static_cast<float *>(nullptr),
                static_cast<const int32_t *>(nullptr),
                static_cast<int32_t *>(nullptr), static_cast<int>(tokens), 0,
                32, stream),
            "sizing the batch-prioritized sort");
        !s)
      return s;
    sortTempBytes = static_cast<int64_t>(bytes);
  }
  int64_t offScores = 0;
  int64_t offFirst = offScores + align(8 * E);
  int64_t offCounts = offFirst + align(4 * E);
  int64_t offChunks = offCounts + align(4 * E);
  int64_t offPriority = offChunks + align(4 * E * std::max<int64_t>(chunks, 1));
  int64_t offKeys = offPriority + align(4 * tokens);
  int64_t offOrder = offKeys + align(4 * tokens);
  int64_t offSorted = offOrder + align(4 * tokens);
  int64_t offNoisy = offSorted + align(4 * tokens);
  int64_t offTemp = offNoisy + align(4 * tokens * E);
  int64_t total = offTemp + align(sortTempBytes);
  void *base = nullptr;
  if (Status s = ctx.scratch(0, total, base); !s)
    return s;
  char *bytes = static_cast<char *>(base);
  auto *scoreSums = reinterpret_cast<double *>(bytes + offScores);
  auto *firstChoices = reinterpret_cast<int32_t *>(bytes + offFirst);
  auto *counts = reinterpret_cast<int32_t *>(bytes + offCounts);
  auto *chunkCounts = reinterpret_cast<int32_t *>(bytes + offChunks);
  auto *priority = reinterpret_cast<float *>(bytes + offPriority);
  auto *keys = reinterpret_cast<float *>(bytes + offKeys);
  auto *order = reinterpret_cast<int32_t *>(bytes + offOrder);
  auto *sorted = reinterpret_cast<int32_t *>(bytes + offSorted);
  auto *noisy = reinterpret_cast<float *>(bytes + offNoisy);

  // scoreSums and firstChoices are adjacent: one memset.
  if (Status s = checkCuda(
          cudaMemsetAsync(scoreSums, 0, offCounts - offScores, stream),
          "clearing the gate's sums");
      !s)
    return s;

  const double noiseScale =
      attrs.noise != 0.0 ? attrs.noise / static_cast<double>(experts) : 0.0;
  const bool normalize = attrs.normalize && k > 1;
  if (tokens > 0) {
    gateTokensKernel<<<detail::gridFor(tokens, 128), 128, 0, stream>>>(
        logits, tokens, E, k, normalize, noiseScale, attrs.seed, out.scores,
        out.indices, out.gates, attrs.batchPrioritized ? priority : nullptr,
        noisy);
    if (Status s = checkLaunch("gate token kernel"); !s)
      return s;
    gateLossKernel<<<detail::gridFor(tokens, 256), 256, 8 * E, stream>>>(
        out.scores, out.indices, tokens, E, k, scoreSums, firstChoices);
    if (Status s = checkLaunch("gate loss kernel"); !s)
      return s;
  }

  SlotSequence sequence{out.indices, nullptr, tokens, k};
  if (attrs.batchPrioritized && tokens > 0) {
    iotaKernel<<<detail::gridFor(tokens, 256), 256, 0, stream>>>(order,
                                                                 tokens);
    if (Status s = checkLaunch("token order kernel"); !s)
      return s;
    size_t tempBytes = static_cast<size_t>(sortTempBytes);
    // Radix sort is stable: equal priorities keep token order.
    if (Status s = checkCuda(cub::DeviceRadixSort::SortPairsDescending(
                                 bytes + offTemp, tempBytes, priority, keys,
                                 order, sorted, static_cast<int>(tokens), 0,
                                 32, stream),
                             "batch-prioritized sort");
        !s)
      return s;
    sequence.order = sorted;
  }

  if (chunks > 0) {
    chunkCountKernel<<<static_cast<unsigned>(chunks), kLocationThreads,
                       4 * E, stream>>>(sequence, length, E, chunkCounts);
    if (Status s = checkLaunch("gate chunk count kernel"); !s)
      return s;
  }
  CapacityParams params{attrs.capacityMode,
                        attrs.capacityFactor,
                        tokens,
                        E,
                        k,
                        attrs.capacityAlignment,
                        attrs.layout == DispatchLayout::Padded};
  gateScanKernel<<<1, 256, 0, stream>>>(chunkCounts, chunks, params,
                                        scoreSums, firstChoices, counts,
                                        out.capacity, out.expertOffsets,
                                        out.expertRows, out.lAux);
  if (Status s = checkLaunch("gate scan kernel"); !s)
    return s;
  if (chunks > 0) {
    int smem = 4 * E * (1 + kLocationThreads / 32);
    locationKernel<<<static_cast<unsigned>(chunks), kLocationThreads, smem,
                     stream>>>(sequence, length, E, chunkCounts,
                               out.locations);
    if (Status s = checkLaunch("gate location kernel"); !s)
      return s;
  }
  return Status::ok();
}

//===----------------------------------------------------------------------===//
// gate_backward
//===----------------------------------------------------------------------===//

namespace {

__global__ void firstChoiceKernel(const int32_t *__restrict__ indices,
                                  int64_t tokens, int32_t k,
                                  int32_t *__restrict__ firstChoices) {
  int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < tokens)
    atomicAdd(&firstChoices[indices[t * k]], 1);
}

__global__ void gateBackwardKernel(const float *__restrict__ gradGates,
                                   const float *__restrict__ gradLAux,
                                   const float *__restrict__ scores,
                                   const int32_t *__restrict__ indices,
                                   const int32_t *__restrict__ firstChoices,
                                   int64_t tokens, int32_t experts, int32_t k,
                                   bool normalize,
                                   float *__restrict__ gradLogits) {
  int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens)
    return;
  const float lossWeight = gradLAux ? *gradLAux : 0.0f;
  const double tokenCount = static_cast<double>(tokens);
  const float *scoreRow = scores + t * experts;
  const int32_t *indexRow = indices + t * k;
  const float *gradGateRow = gradGates + t * k;
  // The gradient of the scores is built in the output row, then replaced.
  float *gradRow = gradLogits + t * experts;
  for (int32_t e = 0; e < experts; ++e)
    gradRow[e] =
        lossWeight != 0.0f
            ? static_cast<float>(static_cast<double>(lossWeight) *
                                 static_cast<double>(experts) *
                                 static_cast<double>(firstChoices[e]) /
                                 (tokenCount * tokenCount))
            : 0.0f;
  if (normalize) {
    float sum = 0.0f;
    for (int32_t j = 0; j < k; ++j)
      sum = __fadd_rn(sum, scoreRow[indexRow[j]]);
    if (sum > kGateNormalizeEps) {
      double weighted = 0.0;
      for (int32_t j = 0; j < k; ++j)
        weighted = __dadd_rn(
            weighted, __dmul_rn(static_cast<double>(gradGateRow[j]),
                                static_cast<double>(__fdiv_rn(
                                    scoreRow[indexRow[j]], sum))));
      for (int32_t j = 0; j < k; ++j)
        gradRow[indexRow[j]] = __fadd_rn(
            gradRow[indexRow[j]],
            static_cast<float>((gradGateRow[j] - weighted) /
                               static_cast<double>(sum)));
    } else {
      for (int32_t j = 0; j < k; ++j)
        gradRow[indexRow[j]] =
            __fadd_rn(gradRow[indexRow[j]],
                      __fdiv_rn(gradGateRow[j], kGateNormalizeEps));
    }
  } else {
    for (int32_t j = 0; j < k; ++j)
      gradRow[indexRow[j]] = __fadd_rn(gradRow[indexRow[j]], gradGateRow[j]);
  }
  double dot = 0.0;
  for (int32_t e = 0; e < experts; ++e)
    dot = __dadd_rn(dot, __dmul_rn(static_cast<double>(gradRow[e]),
                                   static_cast<double>(scoreRow[e])));
  for (int32_t e = 0; e < experts; ++e)
    gradRow[e] = static_cast<float>(
        __dmul_rn(static_cast<double>(scoreRow[e]),
                  static_cast<double>(gradRow[e]) - dot));
}

} // namespace

Status gateBackward(KernelContext &ctx, const float *gradGates,
                    const float *gradLAux, const float *scores,
                    const Routing &routing, const GateBackwardAttrs &attrs,
                    float *gradLogits) {
  const int64_t tokens = routing.tokens;
  const int32_t E = static_cast<int32_t>(routing.experts);
  const int32_t k = static_cast<int32_t>(routing.topK);
  if (tokens <= 0 || E <= 0)
    return Status::ok();
  cudaStream_t stream = ctx.stream();
  void *scratch = nullptr;
  if (Status s = ctx.scratch(0, 4 * E, scratch); !s)
    return s;
  auto *firstChoices = static_cast<int32_t *>(scratch);
  if (Status s = checkCuda(cudaMemsetAsync(firstChoices, 0, 4 * E, stream),
                           "clearing first-choice counts");
      !s)
    return s;
  firstChoiceKernel<<<detail::gridFor(tokens, 256), 256, 0, stream>>>(
      routing.indices, tokens, k, firstChoices);
  if (Status s = checkLaunch("first-choice kernel"); !s)
    return s;
  gateBackwardKernel<<<detail::gridFor(tokens, 128), 128, 0, stream>>>(
      gradGates, gradLAux, scores, routing.indices, firstChoices, tokens, E, k,
      attrs.normalize && k > 1, gradLogits);
  return checkLaunch("gate backward kernel");
}

} // namespace flex::cuda
