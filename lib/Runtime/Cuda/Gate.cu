//===- Gate.cu - gate and gate_backward on the GPU ------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the routing of [gate-1..3], [loc-1], [cap-1] and
// [loss-1] without a host round trip:
//  1. tokens: noise, softmax, top-k, gates, the priority key, in the same
//     fp32 operations and order as the CPU kernel (expf as glibc computes
//     it, explicit roundings where nvcc would fuse a multiply-add; top-k
//     ranked by the noisy logits), so scores and indices match the CPU bit
//     for bit. The fused paths (2 <= E <= 256, k <= 8) also add the [loss-1]
//     partial sums and, in token order, the [loc-1] chunk counts: Auto takes
//     the lane-group kernel of GateFewTokens.cu (a group of lanes per token),
//     or for few tokens the one-block kernel there, which is the whole gate
//     in one launch; the tile kernel here (32 rows per block in shared
//     memory, the per-token work one thread per token) stays for the
//     benchmark (GatePath::Tile). The legacy path (one thread per token over
//     global memory, then a loss kernel) serves larger E and the benchmark;
//  2. batch-prioritized order: a stable CUB radix sort of the tokens by
//     descending priority (stable = std::stable_sort's order);
//  3. locations: the k*T (choice, token) pairs in [loc-1] order are cut into
//     chunks; per chunk a histogram (fused, unless sorted), a scan over
//     chunks per expert, then per chunk the rank of each pair among the
//     earlier pairs of its expert (warp match + per-warp counts), which is
//     exact integer arithmetic;
//  4. one block: counts, [cap-1] capacity, rows and offsets, l_aux.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"
#include "DependentLaunch.cuh"
#include "GateDevice.cuh"
#include "GateInternal.h"

#include <cub/device/device_radix_sort.cuh>

#include <cstdlib>
#include <limits>
#include <string_view>

namespace flex::cuda {

namespace {

constexpr int kLocationThreads = 256;
/// The location kernel keeps 9 counters per expert in shared memory.
constexpr int64_t kMaxGateExperts = 1024;

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
      value = static_cast<float>(
          __dadd_rn(static_cast<double>(value),
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

/// One block: exclusive scan of the chunk counts per expert, then [cap-1],
/// rows, offsets and l_aux.
__global__ void
gateScanKernel(int32_t *__restrict__ chunkCounts, int64_t chunks,
               CapacityParams p, const double *__restrict__ scoreSums,
               const int32_t *__restrict__ firstChoices,
               int32_t *__restrict__ counts, int32_t *__restrict__ capacity,
               int32_t *__restrict__ expertOffsets,
               int32_t *__restrict__ expertRows, float *__restrict__ lAux) {
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
    offset += p.alignRows(rows);
  }
  expertOffsets[p.experts] =
      static_cast<int32_t>(p.padded ? p.experts * cap : offset);
  double loss = 0.0;
  double tokenCount = static_cast<double>(p.tokens);
  for (int32_t e = 0; e < p.experts; ++e)
    loss = __dadd_rn(
        loss, __dmul_rn(scoreSums[e] / tokenCount,
                        static_cast<double>(firstChoices[e]) / tokenCount));
  *lAux = p.tokens > 0
              ? static_cast<float>(static_cast<double>(p.experts) * loss)
              : 0.0f;
}

__global__ void __launch_bounds__(kLocationThreads)
    locationKernel(SlotSequence sequence, int64_t length, int32_t experts,
                   const int32_t *__restrict__ chunkBases,
                   int32_t *__restrict__ locations) {
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  constexpr int kWarps = kLocationThreads / 32;
  extern __shared__ int32_t shared[];
  int32_t *running = shared;              // [experts]
  int32_t *warpCounts = shared + experts; // [kWarps][experts]
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

//===----------------------------------------------------------------------===//
// The fused path (2 <= E <= 256)
//===----------------------------------------------------------------------===//

/// Tokens per block of the fused kernel: the token threads fill one warp.
constexpr int kFusedTokens = 32;
constexpr int kFusedThreads = 128;
constexpr int64_t kMaxFusedGateExperts = 256;
constexpr int kMaxFusedTopK = 8;
constexpr int kScanThreads = 1024;

struct FusedGateParams {
  const float *logits;
  int64_t tokens;
  int32_t experts;
  int32_t k;
  /// Row stride of the shared tile in floats: odd, so the 32 token threads
  /// reading one column each hit 32 different banks.
  int32_t stride;
  /// i / experts == __umulhi(i, rowMagic) for every i < 32 * experts.
  uint32_t rowMagic;
  bool normalize;
  double noiseScale;
  uint64_t seed;
  float *scores;
  int32_t *indices;
  float *gates;
  float *priority;      ///< null without batch-prioritized routing
  int32_t *order;       ///< the sort's token order; null without it
  int32_t *chunkCounts; ///< [loc-1] chunk counts in token order; null with bp
  double *scoreSums;
  int32_t *firstChoices;
};

/// One block, 32 tokens: the rows are read once, coalesced, into a shared
/// tile; element-wise work (noise, exp, the score stores) is spread over all
/// threads, and per-token work runs one thread per token over the tile in
/// the CPU kernel's order (the fp32 sum of the exps is sequential in e), so
/// scores, gates and indices keep the CPU's bits.
template <int K>
__global__ void __launch_bounds__(kFusedThreads)
    gateFusedKernel(FusedGateParams p) {
  extern __shared__ double fusedShared[];
  auto *table = reinterpret_cast<uint64_t *>(fusedShared);
  float *tile = reinterpret_cast<float *>(fusedShared + 32);
  float *rowValue = tile + kFusedTokens * p.stride; // max, then 1 / sum
  auto *firstHistogram = reinterpret_cast<int32_t *>(rowValue + kFusedTokens);
  const int tid = threadIdx.x;
  const int32_t E = p.experts;
  if (tid < 32)
    table[tid] = kExp2Table[tid];
  for (int32_t e = tid; e < E; e += kFusedThreads)
    firstHistogram[e] = 0;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kFusedTokens;
  const int rows = static_cast<int>(
      p.tokens - t0 < kFusedTokens ? p.tokens - t0 : kFusedTokens);
  const int count = rows * E;
  const float *source = p.logits + t0 * E;
  for (int i = tid; i < count; i += kFusedThreads) {
    const int r = static_cast<int>(__umulhi(i, p.rowMagic)), e = i - r * E;
    float value = source[i];
    if (p.noiseScale != 0.0)
      value = static_cast<float>(
          __dadd_rn(static_cast<double>(value),
                    __dmul_rn(p.noiseScale, noiseSample(p.seed, t0 + r, e))));
    tile[r * p.stride + e] = value;
  }
  __syncthreads();

  // [gate-2] top-k by the noisy logits in one pass: a list sorted by
  // ranksAbove, a new value entering behind every entry it does not rank
  // above, so ties keep the lower index and NaN ranks last, as the CPU's k
  // rounds of argmax. Its head is also the row's max (NaN: -inf).
  float listValue[K];
  int32_t listIndex[K];
  bool anyNaN = false;
  if (tid < rows) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      listValue[j] = 0.0f;
      listIndex[j] = -1;
    }
    const float *row = tile + tid * p.stride;
    for (int32_t e = 0; e < E; ++e) {
      const float value = row[e];
      anyNaN |= isnan(value);
      if (listIndex[K - 1] >= 0 && !ranksAbove(value, listValue[K - 1]))
        continue;
      bool above[K];
#pragma unroll
      for (int j = 0; j < K; ++j)
        above[j] = listIndex[j] < 0 || ranksAbove(value, listValue[j]);
#pragma unroll
      for (int j = K - 1; j > 0; --j)
        if (above[j]) {
          listValue[j] = above[j - 1] ? listValue[j - 1] : value;
          listIndex[j] = above[j - 1] ? listIndex[j - 1] : e;
        }
      if (above[0]) {
        listValue[0] = value;
        listIndex[0] = e;
      }
    }
    rowValue[tid] = isnan(listValue[0]) ? -INFINITY : listValue[0];
  }
  __syncthreads();
  const SharedExp2Table expTable{table};
  for (int i = tid; i < count; i += kFusedThreads) {
    const int r = static_cast<int>(__umulhi(i, p.rowMagic)), e = i - r * E;
    float &cell = tile[r * p.stride + e];
    cell = glibcExpfWith(__fsub_rn(cell, rowValue[r]), expTable);
  }
  __syncthreads();

  if (tid < rows) {
    const float *row = tile + tid * p.stride;
    float sum = 0.0f;
    for (int32_t e = 0; e < E; ++e)
      sum = __fadd_rn(sum, row[e]);
    const float inverse =
        anyNaN ? __int_as_float(0x7fc00000) : __fdiv_rn(1.0f, sum);
    rowValue[tid] = inverse;
    const int64_t t = t0 + tid;
    float gate[K];
    float gateSum = 0.0f;
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (j < p.k) {
        gate[j] = __fmul_rn(row[listIndex[j]], inverse);
        gateSum = __fadd_rn(gateSum, gate[j]);
      }
    const float denominator =
        gateSum < kGateNormalizeEps ? kGateNormalizeEps : gateSum;
    const unsigned active =
        rows >= 32 ? 0xffffffffu : (1u << rows) - 1u; // lanes tid < rows
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (j < p.k) {
        p.indices[t * p.k + j] = listIndex[j];
        p.gates[t * p.k + j] =
            p.normalize ? __fdiv_rn(gate[j], denominator) : gate[j];
        if (p.chunkCounts) {
          // [loc-1] counts per chunk of the (choice, token) sequence; lanes
          // with the same cell add once.
          const int64_t chunk = (j * p.tokens + t) / kLocationChunk;
          const int64_t cell = chunk * E + listIndex[j];
          const unsigned same = __match_any_sync(active, cell);
          if ((same & ((1u << tid) - 1u)) == 0)
            atomicAdd(&p.chunkCounts[cell], __popc(same));
        }
      }
    if (p.priority) {
      p.priority[t] = isnan(gate[0]) ? -INFINITY : gate[0];
      p.order[t] = static_cast<int32_t>(t);
    }
    atomicAdd(&firstHistogram[listIndex[0]], 1);
  }
  __syncthreads();
  float *target = p.scores + t0 * E;
  for (int i = tid; i < count; i += kFusedThreads) {
    const int r = static_cast<int>(__umulhi(i, p.rowMagic)), e = i - r * E;
    float &cell = tile[r * p.stride + e];
    cell = __fmul_rn(cell, rowValue[r]);
    target[i] = cell;
  }
  __syncthreads();
  // [loss-1] partial sums (fp64; the order across blocks is free, as in the
  // legacy path: l_aux agrees with the CPU's to rounding).
  for (int32_t e = tid; e < E; e += kFusedThreads) {
    double sum = 0.0;
    for (int r = 0; r < rows; ++r)
      sum = __dadd_rn(sum, static_cast<double>(tile[r * p.stride + e]));
    atomicAdd(&p.scoreSums[e], sum);
    if (int32_t first = firstHistogram[e])
      atomicAdd(&p.firstChoices[e], first);
  }
}

/// gateScanKernel spread over the block: each expert's chunks are cut into
/// kScanThreads / E slices, the offsets are a shared-memory scan and l_aux
/// a tree sum (E <= kMaxFusedGateExperts).
__global__ void __launch_bounds__(kScanThreads) gateScanFusedKernel(
    int32_t *__restrict__ chunkCounts, int64_t chunks, CapacityParams p,
    const double *__restrict__ scoreSums,
    const int32_t *__restrict__ firstChoices, int32_t *__restrict__ counts,
    int32_t *__restrict__ capacity, int32_t *__restrict__ expertOffsets,
    int32_t *__restrict__ expertRows, float *__restrict__ lAux) {
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  __shared__ int32_t sliceTotals[kScanThreads];
  __shared__ int64_t prefix[2][kMaxFusedGateExperts];
  __shared__ double loss[kMaxFusedGateExperts];
  __shared__ int32_t maxCount;
  __shared__ int64_t cap;
  const int tid = threadIdx.x, E = p.experts;
  const int slices = kScanThreads / E, e = tid % E, slice = tid / E;
  const bool active = slice < slices;
  const int64_t per = (chunks + slices - 1) / slices;
  const int64_t begin = min(chunks, slice * per),
                end = min(chunks, begin + per);
  if (tid == 0)
    maxCount = 0;
  int32_t total = 0;
  if (active) {
    for (int64_t c = begin; c < end; ++c)
      total += chunkCounts[c * E + e];
    sliceTotals[tid] = total;
  }
  __syncthreads();
  if (active) {
    int32_t running = 0;
    for (int s = 0; s < slice; ++s)
      running += sliceTotals[s * E + e];
    for (int64_t c = begin; c < end; ++c) {
      int32_t &cell = chunkCounts[c * E + e];
      const int32_t n = cell;
      cell = running;
      running += n;
    }
    if (slice == slices - 1) {
      counts[e] = running;
      prefix[0][e] = running;
      atomicMax(&maxCount, running);
    }
  }
  __syncthreads();
  if (tid == 0) {
    cap = computeCapacity(p.mode, p.factor, p.tokens, p.experts, p.k, maxCount,
                          p.alignment);
    *capacity = static_cast<int32_t>(min(cap, int64_t{INT32_MAX}));
  }
  __syncthreads();
  const double tokenCount = static_cast<double>(p.tokens);
  if (tid < E) {
    const int64_t rows = min(prefix[0][tid], cap);
    expertRows[tid] = static_cast<int32_t>(rows);
    prefix[0][tid] = p.alignRows(rows);
    loss[tid] = __dmul_rn(scoreSums[tid] / tokenCount,
                          static_cast<double>(firstChoices[tid]) / tokenCount);
  }
  __syncthreads();
  // Inclusive scan of the rows (Hillis-Steele, ping-pong buffers).
  int from = 0;
  for (int step = 1; step < E; step *= 2) {
    if (tid < E)
      prefix[1 - from][tid] =
          prefix[from][tid] + (tid >= step ? prefix[from][tid - step] : 0);
    from = 1 - from;
    __syncthreads();
  }
  if (tid < E)
    expertOffsets[tid] = static_cast<int32_t>(
        p.padded ? tid * cap : (tid > 0 ? prefix[from][tid - 1] : 0));
  if (tid == 0)
    expertOffsets[E] =
        static_cast<int32_t>(p.padded ? E * cap : prefix[from][E - 1]);
  for (int half = kMaxFusedGateExperts / 2; half > 0; half /= 2) {
    if (tid < half && tid + half < E)
      loss[tid] = __dadd_rn(loss[tid], loss[tid + half]);
    __syncthreads();
  }
  if (tid == 0)
    *lAux = p.tokens > 0 ? static_cast<float>(static_cast<double>(E) * loss[0])
                         : 0.0f;
}

} // namespace

namespace {

/// The gate's scratch, one area: [scoreSums E f64][firstChoices E][counts E]
/// [chunk counts][priority T, keys T][order T, sorted T][noisy T*E, legacy
/// only][CUB temp]. The first four are cleared together (clearBytes).
struct GateScratch {
  double *scoreSums;
  int32_t *firstChoices, *counts, *chunkCounts;
  float *priority, *keys, *noisy;
  int32_t *order, *sorted;
  void *sortTemp;
  size_t sortTempBytes;
  int64_t clearBytes;
};

Status gateScratch(KernelContext &ctx, int64_t tokens, int32_t E,
                   int64_t chunks, bool legacy, bool batchPrioritized,
                   GateScratch &g) {
  auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  size_t sortTempBytes = 0;
  if (batchPrioritized && tokens > 0) {
    if (Status s = checkCuda(cub::DeviceRadixSort::SortPairsDescending(
                                 nullptr, sortTempBytes,
                                 static_cast<const float *>(nullptr),
                                 static_cast<float *>(nullptr),
                                 static_cast<const int32_t *>(nullptr),
                                 static_cast<int32_t *>(nullptr),
                                 static_cast<int>(tokens), 0, 32, ctx.stream()),
                             "sizing the batch-prioritized sort");
        !s)
      return s;
  }
  int64_t offFirst = align(8 * E);
  int64_t offCounts = offFirst + align(4 * E);
  int64_t offChunks = offCounts + align(4 * E);
  int64_t offPriority = offChunks + align(4 * E * std::max<int64_t>(chunks, 1));
  int64_t offKeys = offPriority + align(4 * tokens);
  int64_t offOrder = offKeys + align(4 * tokens);
  int64_t offSorted = offOrder + align(4 * tokens);
  int64_t offNoisy = offSorted + align(4 * tokens);
  int64_t offTemp = offNoisy + (legacy ? align(4 * tokens * E) : 0);
  int64_t total = offTemp + align(static_cast<int64_t>(sortTempBytes));
  void *base = nullptr;
  if (Status s = ctx.scratch(0, total, base); !s)
    return s;
  char *bytes = static_cast<char *>(base);
  g.scoreSums = reinterpret_cast<double *>(bytes);
  g.firstChoices = reinterpret_cast<int32_t *>(bytes + offFirst);
  g.counts = reinterpret_cast<int32_t *>(bytes + offCounts);
  g.chunkCounts = reinterpret_cast<int32_t *>(bytes + offChunks);
  g.priority = reinterpret_cast<float *>(bytes + offPriority);
  g.keys = reinterpret_cast<float *>(bytes + offKeys);
  g.order = reinterpret_cast<int32_t *>(bytes + offOrder);
  g.sorted = reinterpret_cast<int32_t *>(bytes + offSorted);
  g.noisy = reinterpret_cast<float *>(bytes + offNoisy);
  g.sortTemp = bytes + offTemp;
  g.sortTempBytes = sortTempBytes;
  // The legacy path clears the sums only; the fused one adds chunk counts.
  g.clearBytes = legacy ? offCounts : offPriority;
  return Status::ok();
}

/// checkLaunch, then the stage hook.
struct StageReporter {
  detail::GateStageHook hook;
  void *user;
  Status operator()(const char *stage) const {
    Status s = checkLaunch(stage);
    if (s && hook)
      hook(user, stage);
    return s;
  }
};

template <int K>
void launchFused(unsigned blocks, size_t smem, cudaStream_t stream,
                 const FusedGateParams &p) {
  gateFusedKernel<K><<<blocks, kFusedThreads, smem, stream>>>(p);
}

void launchFusedTokens(cudaStream_t stream, const float *logits, int64_t tokens,
                       int32_t E, int32_t k, bool normalize, double noiseScale,
                       const GateAttrs &attrs, const GateOutputs &out,
                       const GateScratch &g) {
  FusedGateParams p{};
  p.logits = logits;
  p.tokens = tokens;
  p.experts = E;
  p.k = k;
  p.stride = E | 1;
  p.rowMagic = static_cast<uint32_t>(0xffffffffull / E + 1);
  p.normalize = normalize;
  p.noiseScale = noiseScale;
  p.seed = attrs.seed;
  p.scores = out.scores;
  p.indices = out.indices;
  p.gates = out.gates;
  p.priority = attrs.batchPrioritized ? g.priority : nullptr;
  p.order = attrs.batchPrioritized ? g.order : nullptr;
  p.chunkCounts = attrs.batchPrioritized ? nullptr : g.chunkCounts;
  p.scoreSums = g.scoreSums;
  p.firstChoices = g.firstChoices;
  const unsigned blocks =
      static_cast<unsigned>((tokens + kFusedTokens - 1) / kFusedTokens);
  const size_t smem = 8 * 32 + 4 * (kFusedTokens * p.stride + kFusedTokens) +
                      4 * static_cast<size_t>(E);
  switch (k) {
  case 1:
    launchFused<1>(blocks, smem, stream, p);
    break;
  case 2:
    launchFused<2>(blocks, smem, stream, p);
    break;
  case 3:
    launchFused<3>(blocks, smem, stream, p);
    break;
  case 4:
    launchFused<4>(blocks, smem, stream, p);
    break;
  case 5:
    launchFused<5>(blocks, smem, stream, p);
    break;
  case 6:
    launchFused<6>(blocks, smem, stream, p);
    break;
  case 7:
    launchFused<7>(blocks, smem, stream, p);
    break;
  default:
    launchFused<8>(blocks, smem, stream, p);
    break;
  }
}

detail::LaneTokenArgs laneTokenArgs(const float *logits, int64_t tokens,
                                    int32_t E, int32_t k, bool normalize,
                                    double noiseScale, const GateAttrs &attrs,
                                    const GateOutputs &out,
                                    const GateScratch &g) {
  const bool bp = attrs.batchPrioritized;
  return {logits,
          tokens,
          E,
          k,
          normalize,
          noiseScale,
          attrs.seed,
          out.scores,
          out.indices,
          out.gates,
          bp ? g.priority : nullptr,
          bp ? g.order : nullptr,
          bp ? nullptr : g.chunkCounts,
          g.scoreSums,
          g.firstChoices,
          nullptr,
          nullptr,
          nullptr};
}

} // namespace

/// Whether Auto lets the lane kernel's last block route the slots where
/// gateLanesRouteApplies (and prefers it to the one-block gate there):
/// on an H100 (flex-gate-bench, E 64, 2026-12-07) 20.9 us against 25.1 for
/// the lane, scan and location kernels at T 256, k 6, and 19.7 against
/// 22.5 for the one-block gate at T 128, k 8 (16.2 against 15.9 at T 32).
constexpr bool kAutoRoutesInLaneKernel = true;
/// Auto's choice; FLEX_GATE_ROUTE=last-block or =kernels to time the layers
/// with either (a knob of the measurements, as HopperGroupedGemm.cu's
/// FLEX_WGMMA_*).
bool autoRoutesInLaneKernel() {
  static const bool routes = [] {
    const char *v = std::getenv("FLEX_GATE_ROUTE");
    if (v && std::string_view(v) == "kernels")
      return false;
    return v ? std::string_view(v) == "last-block" : kAutoRoutesInLaneKernel;
  }();
  return routes;
}
/// The routed lane kernel's [loss-1] sums, first-choice counts and ticket:
/// a zeroed scratch area its last block leaves zero again (no memset).
constexpr int kRoutedGateSlot = 10;

namespace {

/// The routed lane gate (gateLanesRouteApplies): one launch whose last
/// block writes the locations, [cap-1], rows, offsets and l_aux, with its
/// sums, counts and ticket in a zeroed scratch area it leaves zero.
Status launchRoutedLanes(KernelContext &ctx, const float *logits,
                         int64_t tokens, int32_t E, int32_t k, bool normalize,
                         double noiseScale, const GateAttrs &attrs,
                         const GateOutputs &out) {
  void *area = nullptr;
  const int64_t firstOffset = (8 * int64_t{E} + 255) / 256 * 256,
                ticketOffset = firstOffset + (4 * int64_t{E} + 255) / 256 * 256;
  if (Status s = ctx.zeroedScratch(kRoutedGateSlot, ticketOffset + 4, area); !s)
    return s;
  char *bytes = static_cast<char *>(area);
  GateScratch g{};
  g.scoreSums = static_cast<double *>(area);
  g.firstChoices = reinterpret_cast<int32_t *>(bytes + firstOffset);
  detail::LaneTokenArgs args =
      laneTokenArgs(logits, tokens, E, k, normalize, noiseScale, attrs, out, g);
  args.chunkCounts = nullptr;
  args.ticket = reinterpret_cast<uint32_t *>(bytes + ticketOffset);
  args.attrs = &attrs;
  args.outputs = &out;
  detail::launchLaneTokens(ctx, args);
  return Status::ok();
}

} // namespace

bool detail::gateFusedApplies(int64_t experts, int64_t topK) {
  return experts >= 2 && experts <= kMaxFusedGateExperts &&
         std::clamp<int64_t>(topK, 1, experts) <= kMaxFusedTopK;
}

Status detail::gateWith(KernelContext &ctx, const float *logits, int64_t tokens,
                        int64_t experts, const GateAttrs &attrs,
                        const GateOutputs &out, GatePath path,
                        GateStageHook hook, void *user) {
  if (experts <= 0)
    return Status::ok();
  if (experts > kMaxGateExperts)
    return Status(StatusCode::Unavailable, "the CUDA gate supports up to " +
                                               std::to_string(kMaxGateExperts) +
                                               " experts; got " +
                                               std::to_string(experts));
  ++ctx.generation;
  cudaStream_t stream = ctx.stream();
  const StageReporter report{hook, user};
  const int32_t E = static_cast<int32_t>(experts);
  const int32_t k =
      static_cast<int32_t>(std::clamp<int64_t>(attrs.topK, 1, experts));
  const bool bp = attrs.batchPrioritized && tokens > 0;
  const bool oneBlock = gateOneBlockApplies(tokens, experts, attrs.topK, bp);
  if (path == GatePath::OneBlock && !oneBlock)
    return Status(StatusCode::Unavailable,
                  "the one-block gate does not take T " +
                      std::to_string(tokens) + ", E " +
                      std::to_string(experts) + ", k " +
                      std::to_string(attrs.topK) + (bp ? " prioritized" : ""));
  // The routed lane gate: asked for, or Auto's where it applies (before
  // the one-block gate).
  const bool routes = (path == GatePath::Lanes ||
                       (path == GatePath::Auto && autoRoutesInLaneKernel())) &&
                      gateLanesRouteApplies(tokens, experts, attrs.topK, bp);
  if (path == GatePath::OneBlock ||
      (path == GatePath::Auto && !routes &&
       gateOneBlockPreferred(tokens, experts, attrs.topK, bp))) {
    detail::launchGateOneBlock(ctx, logits, tokens, experts, attrs, out);
    return report("gate one-block kernel");
  }
  const bool legacy =
      path == GatePath::Legacy || !gateFusedApplies(experts, attrs.topK);
  const double noiseScale =
      attrs.noise != 0.0 ? attrs.noise / static_cast<double>(experts) : 0.0;
  const bool normalize = attrs.normalize && k > 1;
  if (!legacy && routes) {
    if (Status s = launchRoutedLanes(ctx, logits, tokens, E, k, normalize,
                                     noiseScale, attrs, out);
        !s)
      return s;
    return report("gate lane kernel, routed in its last block");
  }
  const int64_t length = tokens * k;
  const int64_t chunks = (length + kLocationChunk - 1) / kLocationChunk;
  GateScratch g{};
  if (Status s = gateScratch(ctx, tokens, E, chunks, legacy, bp, g); !s)
    return s;
  if (Status s =
          checkCuda(cudaMemsetAsync(g.scoreSums, 0,
                                    static_cast<size_t>(g.clearBytes), stream),
                    "clearing the gate's sums");
      !s)
    return s;

  if (tokens > 0 && !legacy && path == GatePath::Tile) {
    launchFusedTokens(stream, logits, tokens, E, k, normalize, noiseScale,
                      attrs, out, g);
    if (Status s = report("gate fused token kernel"); !s)
      return s;
  } else if (tokens > 0 && !legacy) {
    detail::launchLaneTokens(ctx, laneTokenArgs(logits, tokens, E, k, normalize,
                                                noiseScale, attrs, out, g));
    if (Status s = report("gate lane token kernel"); !s)
      return s;
  } else if (tokens > 0) {
    gateTokensKernel<<<detail::gridFor(tokens, 128), 128, 0, stream>>>(
        logits, tokens, E, k, normalize, noiseScale, attrs.seed, out.scores,
        out.indices, out.gates, bp ? g.priority : nullptr, g.noisy);
    if (Status s = report("gate token kernel"); !s)
      return s;
    gateLossKernel<<<detail::gridFor(tokens, 256), 256, 8 * E, stream>>>(
        out.scores, out.indices, tokens, E, k, g.scoreSums, g.firstChoices);
    if (Status s = report("gate loss kernel"); !s)
      return s;
  }

  SlotSequence sequence{out.indices, nullptr, tokens, k};
  if (bp) {
    if (legacy) {
      iotaKernel<<<detail::gridFor(tokens, 256), 256, 0, stream>>>(g.order,
                                                                   tokens);
      if (Status s = report("token order kernel"); !s)
        return s;
    }
    size_t tempBytes = g.sortTempBytes;
    // Radix sort is stable: equal priorities keep token order.
    if (Status s =
            checkCuda(cub::DeviceRadixSort::SortPairsDescending(
                          g.sortTemp, tempBytes, g.priority, g.keys, g.order,
                          g.sorted, static_cast<int>(tokens), 0, 32, stream),
                      "batch-prioritized sort");
        !s)
      return s;
    if (Status s = report("batch-prioritized sort"); !s)
      return s;
    sequence.order = g.sorted;
  }

  // The fused kernel counted the chunks already unless the order is sorted.
  if (chunks > 0 && (legacy || bp)) {
    chunkCountKernel<<<static_cast<unsigned>(chunks), kLocationThreads, 4 * E,
                       stream>>>(sequence, length, E, g.chunkCounts);
    if (Status s = report("gate chunk count kernel"); !s)
      return s;
  }
  CapacityParams params{attrs.capacityMode,
                        attrs.capacityFactor,
                        tokens,
                        E,
                        k,
                        attrs.capacityAlignment,
                        attrs.layout == DispatchLayout::Padded,
                        static_cast<int32_t>(layoutRowAlignment(attrs.layout))};
  if (legacy)
    gateScanKernel<<<1, 256, 0, stream>>>(
        g.chunkCounts, chunks, params, g.scoreSums, g.firstChoices, g.counts,
        out.capacity, out.expertOffsets, out.expertRows, out.lAux);
  else
    detail::launchDependent(ctx, gateScanFusedKernel, 1, kScanThreads, 0,
                            g.chunkCounts, chunks, params, g.scoreSums,
                            g.firstChoices, g.counts, out.capacity,
                            out.expertOffsets, out.expertRows, out.lAux);
  if (Status s = report("gate scan kernel"); !s)
    return s;
  if (chunks > 0) {
    int smem = 4 * E * (1 + kLocationThreads / 32);
    detail::launchDependent(ctx, locationKernel, static_cast<unsigned>(chunks),
                            kLocationThreads, smem, sequence, length, E,
                            g.chunkCounts, out.locations);
    if (Status s = report("gate location kernel"); !s)
      return s;
  }
  return Status::ok();
}

Status gate(KernelContext &ctx, const float *logits, int64_t tokens,
            int64_t experts, const GateAttrs &attrs, const GateOutputs &out) {
  return detail::gateWith(ctx, logits, tokens, experts, attrs, out,
                          detail::GatePath::Auto);
}

} // namespace flex::cuda
