//===- GateFewTokens.cu - The gate with a lane group per token ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the gate's token work with a group of G lanes per
// token (G = E / 8 rounded up to a power of two, so each lane holds 8
// logits), in two kernels:
//  - the Lanes token kernel, the fused path's token stage for every T: it
//    writes what the 32-row tile kernel of Gate.cu writes (scores, indices,
//    gates, the [loss-1] partial sums, first-choice counts, the [loc-1]
//    chunk counts or the batch-prioritized keys) and Gate.cu's scan and
//    location kernels follow it; or, up to 2048 (choice, token) pairs
//    (GatePath::Lanes, Auto's choice there), its last block locates every slot
//    and writes [cap-1], offsets, rows and l_aux itself, with no memset before
//    it;
//  - the one-block kernel for few tokens: the same token work, then the
//    batch-prioritized order, the locations, [cap-1], offsets, rows and
//    l_aux in the same launch, so a decode-sized gate is one launch instead
//    of a memset and three.
//
// Why lanes per token: the tile kernel runs the top-k and the softmax sum on
// one thread per token, so a block's latency is E iterations of a k-wide
// insertion plus E dependent adds on one thread, and a small T leaves most
// SMs idle while a large T still waits on that latency (Run 13: 31.6 us at
// T 256 and 41 us at T 16384 for E 64, k 6). Here the loads, the noise and
// the exps run over the group's lanes (8 per lane, independent), the top-k
// is k arg-max rounds of log2(G) shuffles, and only the fp32 softmax sum
// stays sequential: the group's exps go to shared memory in e order and
// every lane of the group adds them back (2 * G float4 loads feeding one
// chain of dependent adds). Per token that is a few hundred instructions
// spread over G lanes instead of ~E * (k + 5) on one thread, with 32 / G
// tokens per warp, so the kernel is shorter at small T and issues fewer
// instructions per token at large T; Auto takes it for every T in the fused
// limits (GatePath::Tile keeps the tile kernel for the bench).
//
// Bit-exactness with the CPU kernel (cpu::gate): every value goes through
// the operations of Gate.cu's kernels in the same order. Lane l of a group
// holds experts e = i * G + l (i < 8); the sum adds the 8 * G slots in e
// order, those past E holding +0, which leaves any sum (never -0) unchanged.
// The arg-max ranks by orderKey, a uint32 whose order is ranksAbove's (NaN
// below every number and above nothing else, -0 equal to +0), ties to the
// lower expert index: the CPU's k rounds of a strict argmax.
//
//===----------------------------------------------------------------------===//

#include "DependentLaunch.cuh"
#include "GateDevice.cuh"
#include "GateInternal.h"

#include <type_traits>

namespace flex::cuda {

namespace {

/// Logits per lane: E <= 8 * G.
constexpr int kSlots = 8;
constexpr int kMaxTopK = 8;
constexpr int kLaneThreads = 256;
constexpr int kLaneBlocksPerSM = 3;
constexpr int kOneBlockThreads = 1024;
constexpr int kOneBlockWarps = kOneBlockThreads / 32;
/// The one-block path's limits (gateOneBlockApplies): at most 4 tokens per
/// lane group (~1 us of dependent work each), 8 rounds of the location
/// pass, and a rank count of T^2 / 4 comparisons per warp for the
/// batch-prioritized order.
constexpr int64_t kOneBlockLaneTokens = 4 * kOneBlockThreads;
constexpr int64_t kOneBlockPairs = 8 * kOneBlockThreads;
constexpr int64_t kOneBlockPrioritizedTokens = 256;
/// gateLanesRouteApplies: (choice, token) pairs the lane kernel's last block
/// locates, 8 rounds of its 256 threads (D1, T 256 x k 6, is 6). On an H100
/// (E 64, k 6) it beat the scan and location kernels at 1536 pairs (20.9
/// against 25.1 us) and lost at 3072 (26.2 against 25.3) and 4080.
constexpr int64_t kLaneRoutePairs = 8 * kLaneThreads;

/// ranksAbove (GateDevice.cuh) as an unsigned order: NaN is 1, -0 is +0,
/// every other float maps monotonically above 1 (-inf to 0x007fffff); 0 is
/// left for absent and taken slots.
__device__ __forceinline__ uint32_t orderKey(float value) {
  if (isnan(value))
    return 1u;
  uint32_t bits = __float_as_uint(value);
  if ((bits << 1) == 0)
    bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// G lanes of a warp serving one token; `mask` holds the warp's lanes that
/// run this code (whole groups).
template <int G> struct LaneGroup {
  unsigned mask;
  int lane;  ///< in the group
  int first; ///< the group's first lane in the warp

  template <typename T>
  __device__ __forceinline__ T from(T value, int src) const {
    if constexpr (G == 1)
      return value;
    else
      return __shfl_sync(mask, value, src, G);
  }
  template <typename T>
  __device__ __forceinline__ T xorWith(T value, int offset) const {
    return __shfl_xor_sync(mask, value, offset, G);
  }
  __device__ __forceinline__ bool any(bool flag) const {
    const unsigned votes = __ballot_sync(mask, flag);
    const unsigned groupMask =
        G == 32 ? 0xffffffffu : ((1u << G) - 1u) << first;
    return (votes & groupMask) != 0;
  }
};

/// values[slot] with a constant-indexed select (keeps the array in registers).
template <typename T>
__device__ __forceinline__ T pickSlot(const T (&values)[kSlots], int slot) {
  T result = values[0];
#pragma unroll
  for (int i = 1; i < kSlots; ++i)
    if (i == slot)
      result = values[i];
  return result;
}

/// One arg-max round: the best key of the group, ties to the lower expert
/// (each lane scans its slots in e order, then (key, -e) is maximized over
/// the group, the same on every lane); the winner's slot is taken (key 0).
template <int G>
__device__ __forceinline__ int32_t takeBest(uint32_t (&key)[kSlots],
                                            const LaneGroup<G> &group) {
  uint32_t bestKey = 0;
  int32_t best = INT32_MAX;
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
    if (key[i] > bestKey) {
      bestKey = key[i];
      best = i * G + group.lane;
    }
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    const uint32_t otherKey = group.xorWith(bestKey, offset);
    const int32_t other = group.xorWith(best, offset);
    if (otherKey > bestKey || (otherKey == bestKey && other < best)) {
      bestKey = otherKey;
      best = other;
    }
  }
  if ((best & (G - 1)) == group.lane) {
    const int slot = best / G;
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (i == slot)
        key[i] = 0;
  }
  return best;
}

/// What routeToken leaves on every lane of the group.
struct RoutedToken {
  int32_t choice[kMaxTopK]; ///< [0, k)
  float top;                ///< the first choice's score (not normalized)
  float score[kSlots];      ///< this lane's scores (0 past E)
};

struct TokenParams {
  const float *logits;
  int64_t tokens;
  int32_t experts, k;
  bool normalize;
  double noiseScale;
  uint64_t seed;
  float *scores;
  int32_t *indices;
  float *gates;
};

/// [gate-1..3] of token t on its lane group: scores, indices and gates
/// stored, in the CPU kernel's operations and order (file comment).
/// `row` is the group's 8 * G floats of shared memory (16-byte aligned): the
/// exps in e order, read back as float4 by every lane for the sum (shared
/// loads cost a quarter of the shuffles they replace) and for the gates.
template <int G>
__device__ __forceinline__ void
routeToken(const TokenParams &p, int64_t t, const LaneGroup<G> &group,
           const SharedExp2Table &table, float *row, RoutedToken &r) {
  const int32_t E = p.experts;
  const float *logitRow = p.logits + t * E;
  float v[kSlots];
  uint32_t key[kSlots];
  bool nan = false;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int32_t e = i * G + group.lane;
    float value = 0.0f;
    key[i] = 0;
    if (e < E) {
      value = logitRow[e];
      if (p.noiseScale != 0.0)
        value = static_cast<float>(
            __dadd_rn(static_cast<double>(value),
                      __dmul_rn(p.noiseScale, noiseSample(p.seed, t, e))));
      nan |= isnan(value);
      key[i] = orderKey(value);
    }
    v[i] = value;
  }
  // The first choice is the row's max (NaN: -inf), as maxLogit on the CPU.
  r.choice[0] = takeBest(key, group);
  const float top =
      group.from(pickSlot(v, r.choice[0] / G), r.choice[0] & (G - 1));
  const float maxLogit = isnan(top) ? -INFINITY : top;
  const bool anyNaN = group.any(nan);
  float x[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
    x[i] = i * G + group.lane < E
               ? glibcExpfWith(__fsub_rn(v[i], maxLogit), table)
               : 0.0f;
  __syncwarp(group.mask); // the previous token's reads of `row` are done
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
    row[i * G + group.lane] = x[i];
  __syncwarp(group.mask);
  float sum = 0.0f;
#pragma unroll
  for (int q = 0; q < kSlots * G / 4; ++q) {
    const float4 four = reinterpret_cast<const float4 *>(row)[q];
    sum = __fadd_rn(
        __fadd_rn(__fadd_rn(__fadd_rn(sum, four.x), four.y), four.z), four.w);
  }
  const float inverse =
      anyNaN ? __int_as_float(0x7fc00000) : __fdiv_rn(1.0f, sum);
  float *scoreRow = p.scores + t * E;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    r.score[i] = __fmul_rn(x[i], inverse);
    if (i * G + group.lane < E)
      scoreRow[i * G + group.lane] = r.score[i];
  }
  // [gate-2] the other choices, [gate-3] the gates.
  float gate[kMaxTopK];
  float gateSum = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j)
    if (j < p.k) {
      if (j > 0)
        r.choice[j] = takeBest(key, group);
      gate[j] = __fmul_rn(row[r.choice[j]], inverse);
      gateSum = __fadd_rn(gateSum, gate[j]);
    }
  r.top = gate[0];
  // std::max(sum, eps) keeps a NaN sum.
  const float denominator =
      gateSum < kGateNormalizeEps ? kGateNormalizeEps : gateSum;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j)
    if (j < p.k && (j & (G - 1)) == group.lane) {
      p.indices[t * p.k + j] = r.choice[j];
      p.gates[t * p.k + j] =
          p.normalize ? __fdiv_rn(gate[j], denominator) : gate[j];
    }
}

template <int G>
__device__ __forceinline__ LaneGroup<G> groupOf(unsigned mask) {
  const int laneInWarp = threadIdx.x & 31;
  return {mask, laneInWarp & (G - 1), laneInWarp & ~(G - 1)};
}

//===----------------------------------------------------------------------===//
// The Lanes token kernel
//===----------------------------------------------------------------------===//

/// What the routing after the tokens writes: [loc-1] locations, [cap-1],
/// the experts' rows and offsets, and l_aux.
struct RoutingParams {
  CapacityParams capacity;
  int32_t *locations, *capacityOut, *offsets, *rows;
  float *lAux;
};

/// [loc-1] over the whole (choice, token) sequence in rounds of one pair per
/// thread of a block of Threads: within a warp by match_any, across warps
/// by per-warp counts (`warpCounts` [Threads / 32][E], zero), as Gate.cu's
/// location kernel. `running` (E, zero) is left holding the per-expert
/// counts. The indices are read from L2 (__ldcg): other blocks may have
/// written them (the lane kernel's last block); `order` (shared memory or
/// null) is this block's. (Loading the next round's slot before this
/// round's barriers made the lane and one-block kernels spill for E <= 32.)
template <int Threads>
__device__ void locateSlots(const TokenParams &token, int32_t *locations,
                            const int32_t *order, int32_t *warpCounts,
                            int32_t *running) {
  const int32_t E = token.experts, k = token.k;
  const int64_t T = token.tokens, length = T * k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lowerLanes = (1u << lane) - 1u;
  const int32_t *indices = token.indices;
  auto slotAt = [&](int64_t s, int32_t &expert) -> int64_t {
    expert = -1;
    if (s >= length)
      return -1;
    const int64_t j = s / T, q = s - j * T;
    const int64_t slot = (order ? order[q] : q) * k + j;
    expert = __ldcg(indices + slot);
    return slot;
  };
  for (int64_t round = 0; round < length; round += Threads) {
    int32_t expert;
    const int64_t slot = slotAt(round + threadIdx.x, expert);
    const unsigned same = __match_any_sync(0xffffffffu, expert);
    const int32_t rankInWarp = __popc(same & lowerLanes);
    const bool leader = rankInWarp == 0;
    if (leader && expert >= 0)
      warpCounts[warp * E + expert] = __popc(same);
    __syncthreads();
    if (expert >= 0) {
      int32_t before = running[expert];
      for (int w = 0; w < warp; ++w)
        before += warpCounts[w * E + expert];
      locations[slot] = before + rankInWarp;
    }
    __syncthreads();
    if (leader && expert >= 0) {
      atomicAdd(&running[expert], __popc(same));
      warpCounts[warp * E + expert] = 0;
    }
    __syncthreads();
  }
}

/// [cap-1], rows, offsets and l_aux from the counts, as Gate.cu's fused
/// scan kernel, on a block of at least E threads. `means` holds the score
/// sums (overwritten), `prefix` 2 * E; `maxCount` starts at 0.
__device__ void finishRouting(const TokenParams &token, const RoutingParams &p,
                              const int32_t *counts, const int32_t *first,
                              double *means, int64_t *prefix, int32_t &maxCount,
                              int64_t &cap) {
  const int tid = threadIdx.x, E = token.experts;
  if (tid < E)
    atomicMax(&maxCount, counts[tid]);
  __syncthreads();
  if (tid == 0) {
    const CapacityParams &c = p.capacity;
    cap = computeCapacity(c.mode, c.factor, c.tokens, c.experts, c.k, maxCount,
                          c.alignment);
    *p.capacityOut = static_cast<int32_t>(min(cap, int64_t{INT32_MAX}));
  }
  __syncthreads();
  const double tokenCount = static_cast<double>(token.tokens);
  if (tid < E) {
    const int64_t rows = min(int64_t{counts[tid]}, cap);
    p.rows[tid] = static_cast<int32_t>(rows);
    prefix[tid] = p.capacity.alignRows(rows);
    means[tid] = __dmul_rn(means[tid] / tokenCount,
                           static_cast<double>(first[tid]) / tokenCount);
  }
  __syncthreads();
  // Inclusive scan of the rows (Hillis-Steele, ping-pong halves).
  int from = 0;
  for (int step = 1; step < E; step *= 2) {
    if (tid < E)
      prefix[(1 - from) * E + tid] =
          prefix[from * E + tid] +
          (tid >= step ? prefix[from * E + tid - step] : 0);
    from = 1 - from;
    __syncthreads();
  }
  const bool padded = p.capacity.padded;
  if (tid < E)
    p.offsets[tid] = static_cast<int32_t>(
        padded ? tid * cap : (tid > 0 ? prefix[from * E + tid - 1] : 0));
  if (tid == 0)
    p.offsets[E] =
        static_cast<int32_t>(padded ? E * cap : prefix[from * E + E - 1]);
  for (int half = 128; half > 0; half /= 2) {
    if (tid < half && tid + half < E)
      means[tid] = __dadd_rn(means[tid], means[tid + half]);
    __syncthreads();
  }
  if (tid == 0)
    *p.lAux = token.tokens > 0
                  ? static_cast<float>(static_cast<double>(E) * means[0])
                  : 0.0f;
}

struct LaneKernelParams {
  TokenParams token;
  /// Tokens per group; a block's tokens span at most 1024 (two location
  /// chunks per choice).
  int32_t perGroup;
  float *priority;
  int32_t *order;
  int32_t *chunkCounts;
  double *scoreSums;
  int32_t *firstChoices;
  /// Non-null: the last block to finish routes every slot (ticket counts
  /// the finished blocks from 0; chunkCounts is null) and leaves the ticket,
  /// scoreSums and firstChoices zero.
  uint32_t *ticket;
  RoutingParams routing;
};

/// Adds the block's [loss-1] sums: lane l of each group holds experts
/// i * G + l; the groups of a warp are summed by shuffles, the warps in
/// order through shared memory, then one atomic per expert.
template <int G>
__device__ void addLossSums(double (&sums)[kSlots], double *warpSums, int32_t E,
                            double *scoreSums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
#pragma unroll
    for (int offset = G; offset < 32; offset *= 2)
      sums[i] += __shfl_xor_sync(0xffffffffu, sums[i], offset);
  if (lane < G)
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (i * G + lane < E)
        warpSums[warp * E + i * G + lane] = sums[i];
  __syncthreads();
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
    double sum = 0.0;
    for (int w = 0; w < kLaneThreads / 32; ++w)
      sum = __dadd_rn(sum, warpSums[w * E + e]);
    if (sum != 0.0)
      atomicAdd(&scoreSums[e], sum);
  }
}

/// The routing after every block's tokens, in the last block: [loc-1]
/// over the whole sequence (locateSlots), then [cap-1], rows, offsets and
/// l_aux (finishRouting) from the sums and counts all blocks added, which
/// it leaves zero again with the ticket (the caller clears them once).
/// `area`
/// is the token rows (8 KiB: the warp counts, 8 x E ints) and the warp sums
/// (8 x E doubles: means, prefix, running and first counts, 4 x E words).
__device__ void routeInLastBlock(const LaneKernelParams &p, double *area) {
  constexpr int kWarps = kLaneThreads / 32;
  static_assert(kSlots * kLaneThreads * 4 >= kWarps * 256 * 4,
                "the token rows hold the warp counts");
  __shared__ int32_t maxCount;
  __shared__ int64_t cap;
  const int32_t E = p.token.experts;
  const int tid = threadIdx.x;
  auto *warpCounts = reinterpret_cast<int32_t *>(area);
  double *means = area + kSlots * kLaneThreads / 2;
  auto *prefix = reinterpret_cast<int64_t *>(means + E);
  auto *running = reinterpret_cast<int32_t *>(prefix + 2 * E);
  int32_t *first = running + E;
  for (int i = tid; i < kWarps * E; i += kLaneThreads)
    warpCounts[i] = 0;
  // Read, then cleared for the next call (every other block has added).
  for (int32_t e = tid; e < E; e += kLaneThreads) {
    running[e] = 0;
    means[e] = __ldcg(p.scoreSums + e);
    first[e] = __ldcg(p.firstChoices + e);
    p.scoreSums[e] = 0.0;
    p.firstChoices[e] = 0;
  }
  if (tid == 0) {
    maxCount = 0;
    *p.ticket = 0;
  }
  __syncthreads();
  locateSlots<kLaneThreads>(p.token, p.routing.locations, nullptr, warpCounts,
                            running);
  __syncthreads();
  finishRouting(p.token, p.routing, running, first, means, prefix, maxCount,
                cap);
}

/// 3 blocks per SM (at most 80 registers a thread): 24 warps to hide the
/// latency of the dependent shuffles and adds.
template <int G>
__global__ void __launch_bounds__(kLaneThreads, kLaneBlocksPerSM)
    gateLanesKernel(LaneKernelParams p) {
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  extern __shared__ double laneShared[];
  const int32_t E = p.token.experts, k = p.token.k;
  auto *table = reinterpret_cast<uint64_t *>(laneShared);
  auto *rows = reinterpret_cast<float *>(laneShared + 32);        // 8 a thread
  double *warpSums = laneShared + 32 + kSlots * kLaneThreads / 2; // [warps][E]
  auto *first = reinterpret_cast<int32_t *>(warpSums + (kLaneThreads / 32) * E);
  int32_t *histogram = first + E; // [k][2][E] with chunk counts
  const int tid = threadIdx.x;
  const int cells = p.chunkCounts ? 2 * k * E : 0;
  if (tid < 32)
    table[tid] = kExp2Table[tid];
  for (int i = tid; i < E + cells; i += kLaneThreads)
    first[i] = 0;
  __syncthreads();
  constexpr int kGroups = kLaneThreads / G;
  const int64_t T = p.token.tokens;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kGroups * p.perGroup;
  const SharedExp2Table expTable{table};
  double sums[kSlots] = {};
  for (int32_t round = 0; round < p.perGroup; ++round) {
    const int64_t t = t0 + static_cast<int64_t>(round) * kGroups + tid / G;
    const unsigned mask = __ballot_sync(0xffffffffu, t < T);
    if (t >= T)
      continue;
    const LaneGroup<G> group = groupOf<G>(mask);
    RoutedToken r;
    routeToken(p.token, t, group, expTable, rows + (tid / G) * kSlots * G, r);
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      sums[i] = __dadd_rn(sums[i], static_cast<double>(r.score[i]));
    if (group.lane == 0) {
      atomicAdd(&first[r.choice[0]], 1);
      if (p.priority) {
        p.priority[t] = isnan(r.top) ? -INFINITY : r.top;
        p.order[t] = static_cast<int32_t>(t);
      }
    }
    if (p.chunkCounts)
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j)
        if (j < k && (j & (G - 1)) == group.lane) {
          const int64_t chunk = (j * T + t) / kLocationChunk -
                                (j * T + t0) / kLocationChunk; // 0 or 1
          atomicAdd(&histogram[(j * 2 + chunk) * E + r.choice[j]], 1);
        }
  }
  addLossSums<G>(sums, warpSums, E, p.scoreSums);
  __syncthreads();
  for (int32_t e = tid; e < E; e += kLaneThreads)
    if (int32_t count = first[e])
      atomicAdd(&p.firstChoices[e], count);
  for (int cell = tid; cell < cells; cell += kLaneThreads)
    if (int32_t count = histogram[cell]) {
      const int j = cell / (2 * E), half = (cell / E) % 2, e = cell % E;
      const int64_t chunk = (j * T + t0) / kLocationChunk + half;
      atomicAdd(&p.chunkCounts[chunk * E + e], count);
    }
  if (!p.ticket)
    return;
  // Each thread's fence orders its indices, sums and counts before the
  // block's ticket; the last block's fence orders its reads after them.
  __shared__ bool lastBlock;
  __threadfence();
  __syncthreads();
  if (tid == 0)
    lastBlock = atomicAdd(p.ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!lastBlock)
    return;
  __threadfence();
  routeInLastBlock(p, laneShared + 32);
}

/// Lanes per token: E / 8 rounded up to a power of two (E <= 256).
int lanesFor(int64_t experts) {
  int lanes = 1;
  while (lanes * kSlots < experts)
    lanes *= 2;
  return lanes;
}

/// Calls f(std::integral_constant<int, G>) for lanes = G, a power of two
/// up to 32 (lanesFor): the kernels take G as a template argument.
template <typename F> void withLanes(int lanes, F f) {
  switch (lanes) {
  case 1:
    return f(std::integral_constant<int, 1>{});
  case 2:
    return f(std::integral_constant<int, 2>{});
  case 4:
    return f(std::integral_constant<int, 4>{});
  case 8:
    return f(std::integral_constant<int, 8>{});
  case 16:
    return f(std::integral_constant<int, 16>{});
  default:
    return f(std::integral_constant<int, 32>{});
  }
}

template <int G>
void launchLanes(const KernelContext &ctx, unsigned blocks, size_t smem,
                 const LaneKernelParams &p) {
  detail::launchDependent(ctx, gateLanesKernel<G>, blocks, kLaneThreads, smem,
                          p);
}

//===----------------------------------------------------------------------===//
// The one-block gate
//===----------------------------------------------------------------------===//

struct OneBlockParams {
  TokenParams token;
  bool prioritized;
  RoutingParams routing;
};

/// The token phase: every group routes tokens g, g + groups, ...
template <int G>
__device__ void oneBlockTokens(const OneBlockParams &p,
                               const SharedExp2Table &table, float *rows,
                               int32_t *first, float *priority) {
  constexpr int kGroups = kOneBlockThreads / G;
  const int64_t T = p.token.tokens;
  const int64_t rounds = (T + kGroups - 1) / kGroups;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t t = round * kGroups + threadIdx.x / G;
    const unsigned mask = __ballot_sync(0xffffffffu, t < T);
    if (t >= T)
      continue;
    const LaneGroup<G> group = groupOf<G>(mask);
    RoutedToken r;
    routeToken(p.token, t, group, table, rows + (threadIdx.x / G) * kSlots * G,
               r);
    if (group.lane == 0) {
      atomicAdd(&first[r.choice[0]], 1);
      if (priority)
        priority[t] = isnan(r.top) ? -INFINITY : r.top;
    }
  }
}

/// [loss-1] sums of the scores the block wrote, `parts` token slices per
/// expert (fp64, a fixed order: the same bits every run).
__device__ void scorePartials(const OneBlockParams &p, int parts,
                              double *partials) {
  const int32_t E = p.token.experts;
  const int64_t T = p.token.tokens;
  const int e = threadIdx.x % E, part = threadIdx.x / E;
  if (part >= parts)
    return;
  const float *scores = p.token.scores;
  double sum = 0.0;
  for (int64_t t = part; t < T; t += parts)
    sum = __dadd_rn(sum, static_cast<double>(scores[t * E + e]));
  partials[part * E + e] = sum;
}

/// The stable descending order of the priorities (std::stable_sort's, the
/// radix sort's): rank(t) = #{u: p_u > p_t} + #{u < t: p_u == p_t}, counted
/// over slices of u. Priorities are never NaN (NaN rows have -inf).
__device__ void rankPartials(const float *priority, int64_t T, int32_t *rank) {
  if (T == 0)
    return;
  const int slices = static_cast<int>(kOneBlockThreads / T);
  const int t = static_cast<int>(threadIdx.x % T),
            slice = static_cast<int>(threadIdx.x / T);
  if (slice >= slices)
    return;
  const float mine = priority[t];
  int32_t count = 0;
  for (int u = slice; u < T; u += slices) {
    const float other = priority[u];
    count += other > mine || (other == mine && u < t);
  }
  if (count)
    atomicAdd(&rank[t], count);
}

/// Doubles of the area shared, phase after phase, by the token rows (8
/// floats a thread), the score partials (1024) and the warp counts (32 * E
/// ints, E <= 256): 32 KiB.
constexpr int64_t kOneBlockAreaDoubles = kSlots * kOneBlockThreads / 2;
static_assert(kOneBlockAreaDoubles >= kOneBlockThreads &&
                  2 * kOneBlockAreaDoubles >= kOneBlockWarps * 256,
              "the one-block area holds each phase's data");

/// The whole gate in one block; its phases are separated by barriers.
template <int G>
__global__ void __launch_bounds__(kOneBlockThreads)
    gateOneBlockKernel(OneBlockParams p) {
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  extern __shared__ double oneShared[];
  __shared__ int32_t maxCount;
  __shared__ int64_t cap;
  const int32_t E = p.token.experts;
  const int64_t T = p.token.tokens;
  const int tid = threadIdx.x;
  auto *table = reinterpret_cast<uint64_t *>(oneShared);
  // The area first: its token rows are read as float4, so it must start
  // 16-byte aligned whatever E is (after 8 * E bytes of means it would not
  // for odd E).
  double *area = oneShared + 32;
  double *means = area + kOneBlockAreaDoubles;
  auto *prefix = reinterpret_cast<int64_t *>(means + E);
  auto *first = reinterpret_cast<int32_t *>(prefix + 2 * E);
  int32_t *running = first + E;
  float *priority =
      p.prioritized ? reinterpret_cast<float *>(running + E) : nullptr;
  auto *rank = reinterpret_cast<int32_t *>(running + E + T);
  int32_t *sorted = rank + T;
  if (tid < 32)
    table[tid] = kExp2Table[tid];
  for (int i = tid; i < 2 * E; i += kOneBlockThreads)
    first[i] = 0; // and running
  if (priority)
    for (int64_t t = tid; t < T; t += kOneBlockThreads)
      rank[t] = 0;
  if (tid == 0)
    maxCount = 0;
  __syncthreads();
  oneBlockTokens<G>(p, SharedExp2Table{table}, reinterpret_cast<float *>(area),
                    first, priority);
  __syncthreads();
  const int parts = min(32, kOneBlockThreads / E);
  scorePartials(p, parts, area);
  if (priority)
    rankPartials(priority, T, rank);
  __syncthreads();
  if (tid < E) {
    double sum = 0.0;
    for (int part = 0; part < parts; ++part)
      sum = __dadd_rn(sum, area[part * E + tid]);
    means[tid] = sum;
  }
  if (priority)
    for (int64_t t = tid; t < T; t += kOneBlockThreads)
      sorted[rank[t]] = static_cast<int32_t>(t);
  __syncthreads();
  auto *warpCounts = reinterpret_cast<int32_t *>(area);
  for (int i = tid; i < kOneBlockWarps * E; i += kOneBlockThreads)
    warpCounts[i] = 0;
  __syncthreads();
  locateSlots<kOneBlockThreads>(p.token, p.routing.locations,
                                priority ? sorted : nullptr, warpCounts,
                                running);
  __syncthreads();
  finishRouting(p.token, p.routing, running, first, means, prefix, maxCount,
                cap);
}

template <int G>
void launchOneBlock(const KernelContext &ctx, size_t smem,
                    const OneBlockParams &p) {
  detail::launchDependent(ctx, gateOneBlockKernel<G>, 1, kOneBlockThreads, smem,
                          p);
}

RoutingParams routingParams(int64_t tokens, int32_t E, int32_t k,
                            const GateAttrs &attrs, const GateOutputs &out) {
  RoutingParams r{};
  r.capacity = {attrs.capacityMode,
                attrs.capacityFactor,
                tokens,
                E,
                k,
                attrs.capacityAlignment,
                attrs.layout == DispatchLayout::Padded,
                static_cast<int32_t>(layoutRowAlignment(attrs.layout))};
  r.locations = out.locations;
  r.capacityOut = out.capacity;
  r.offsets = out.expertOffsets;
  r.rows = out.expertRows;
  r.lAux = out.lAux;
  return r;
}

} // namespace

void detail::launchLaneTokens(KernelContext &ctx, const LaneTokenArgs &a) {
  LaneKernelParams p{};
  p.token = {a.logits,     a.tokens, a.experts, a.k,       a.normalize,
             a.noiseScale, a.seed,   a.scores,  a.indices, a.gates};
  p.priority = a.priority;
  p.order = a.order;
  p.chunkCounts = a.chunkCounts;
  p.scoreSums = a.scoreSums;
  p.firstChoices = a.firstChoices;
  p.ticket = a.ticket;
  if (a.ticket)
    p.routing = routingParams(a.tokens, a.experts, a.k, *a.attrs, *a.outputs);
  const int G = lanesFor(a.experts);
  const int64_t groups = kLaneThreads / G;
  // One token per group while the device holds every group at once; beyond,
  // a few per group (fewer block-end flushes), at most 1024 tokens a block.
  const int64_t resident = std::max<int64_t>(1, int64_t{ctx.multiprocessors()} *
                                                    kLaneBlocksPerSM * groups);
  p.perGroup = static_cast<int32_t>(std::clamp<int64_t>(
      (a.tokens + resident - 1) / resident, 1, 1024 / groups));
  const int64_t perBlock = groups * p.perGroup;
  const unsigned blocks =
      static_cast<unsigned>((a.tokens + perBlock - 1) / perBlock);
  const int64_t E = a.experts;
  const size_t smem = 8 * 32 + 4 * kSlots * kLaneThreads +
                      8 * (kLaneThreads / 32) * E + 4 * E +
                      (a.chunkCounts ? 4 * 2 * a.k * E : 0);
  withLanes(G, [&](auto lanes) {
    launchLanes<decltype(lanes)::value>(ctx, blocks, smem, p);
  });
}

bool detail::gateOneBlockApplies(int64_t tokens, int64_t experts, int64_t topK,
                                 bool batchPrioritized) {
  if (!gateFusedApplies(experts, topK) || tokens < 0)
    return false;
  const int64_t k = std::clamp<int64_t>(topK, 1, experts);
  return tokens * lanesFor(experts) <= kOneBlockLaneTokens &&
         tokens * k <= kOneBlockPairs &&
         (!batchPrioritized || tokens <= kOneBlockPrioritizedTokens);
}

bool detail::gateLanesRouteApplies(int64_t tokens, int64_t experts,
                                   int64_t topK, bool batchPrioritized) {
  if (!gateFusedApplies(experts, topK) || tokens <= 0 || batchPrioritized)
    return false;
  return tokens * std::clamp<int64_t>(topK, 1, experts) <= kLaneRoutePairs;
}

bool detail::gateOneBlockPreferred(int64_t tokens, int64_t experts,
                                   int64_t topK, bool batchPrioritized) {
  // Measured on an H100 (bench/RESULTS.md Run 23, E 64): with one token per
  // lane group the one launch wins (T 128, k 8: 21.9 against 24.3 us for
  // the lane kernel's launches; T 32: 15.1 against 20.5), with two it
  // loses (T 256: 31.1 against 23.7); prioritized, it replaces the radix
  // sort (T 256: 36.4 against 37.2).
  return gateOneBlockApplies(tokens, experts, topK, batchPrioritized) &&
         (batchPrioritized || tokens * lanesFor(experts) <= kOneBlockThreads);
}

void detail::launchGateOneBlock(KernelContext &ctx, const float *logits,
                                int64_t tokens, int64_t experts,
                                const GateAttrs &attrs,
                                const GateOutputs &out) {
  const int32_t E = static_cast<int32_t>(experts);
  const int32_t k =
      static_cast<int32_t>(std::clamp<int64_t>(attrs.topK, 1, experts));
  OneBlockParams p{};
  p.token.logits = logits;
  p.token.tokens = tokens;
  p.token.experts = E;
  p.token.k = k;
  p.token.normalize = attrs.normalize && k > 1;
  p.token.noiseScale =
      attrs.noise != 0.0 ? attrs.noise / static_cast<double>(experts) : 0.0;
  p.token.seed = attrs.seed;
  p.token.scores = out.scores;
  p.token.indices = out.indices;
  p.token.gates = out.gates;
  p.prioritized = attrs.batchPrioritized && tokens > 0;
  p.routing = routingParams(tokens, E, k, attrs, out);
  // table, means, prefix, the shared area, first and running counts, and
  // priority, rank and order with batch-prioritized routing (< 48 KiB).
  const size_t smem = 8 * (32 + 3 * experts + kOneBlockAreaDoubles) +
                      4 * 2 * experts + (p.prioritized ? 12 * tokens : 0);
  withLanes(lanesFor(experts), [&](auto lanes) {
    launchOneBlock<decltype(lanes)::value>(ctx, smem, p);
  });
}

} // namespace flex::cuda
