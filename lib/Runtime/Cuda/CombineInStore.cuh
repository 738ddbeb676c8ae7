//===- CombineInStore.cuh - The combine in a grouped GEMM's store -*- CUDA
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the device half of grouped_gemm_combine: after a tile of
// the product is stored, each of its rows counts one arrival for its token
// and column block; the tile that stores a token's last kept row sums the
// token's rows into out there, as the combine kernel does (its choices in
// order, fp32, one rounding). So out is bit for bit the combine's, with no
// second pass over the rows and no second launch.
//
// Ordering: every thread fences its stores before the arrival is counted
// (the threadfence-reduction pattern), and the tile that sees the last
// arrival fences before it reads the other tiles' rows, through L2 (L1 is
// not coherent across SMs).
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_COMBINEINSTORE_CUH
#define LIB_RUNTIME_CUDA_COMBINEINSTORE_CUH

#include "CudaSupport.cuh"
#include "GroupedGemmInternal.h"

namespace flex::cuda::detail {

/// The number of t's kept choices (their locations inside the capacity).
__device__ __forceinline__ int keptChoices(const Routing &r, int64_t t) {
  const int32_t capacity = *r.capacity;
  int kept = 0;
  for (int64_t j = 0; j < r.topK; ++j) {
    const int32_t location = r.locations[t * r.topK + j];
    kept += location >= 0 && location < capacity;
  }
  return kept;
}

/// Counts `row`'s arrival in the tile starting at column n0; true when it
/// was its token's last kept row (the counter is then reset), with the
/// token in `token`. Call after the row's stores were fenced.
__device__ __forceinline__ bool arriveRow(const CombineInStore &p, int64_t row,
                                          int64_t n0, int64_t &token) {
  token = p.rowTokens[row];
  if (token < 0 || token >= p.routing.tokens)
    return false;
  int32_t *counter = p.arrivals + token * p.blocks + n0 / kCombineBlockColumns;
  const int kept = keptChoices(p.routing, token);
  if (atomicAdd(counter, 1) + 1 != kept)
    return false;
  *counter = 0; // every arrival of this launch is in
  return true;
}

/// Loads the 8 elements of T (16 bytes) at p from L2 as fp32: rows other
/// tiles stored during this launch (L1 is not coherent across SMs).
template <typename T>
__device__ __forceinline__ void loadFromL2(const T *p, float (&v)[8]) {
  uint4 raw = __ldcg(reinterpret_cast<const uint4 *>(p));
  const T *values = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    v[i] = toFloat(values[i]);
}

/// out[t, n0 .. n0 + width) = the sum over t's kept choices, in order, of
/// gate x c[row], in fp32 with one rounding: the combine kernel's
/// arithmetic, by one warp (every lane calls it). As the combine kernel,
/// lane j < k finds choice j's row and gate once and the warp shares them,
/// so each lane's loads of the k rows (8 columns of a 16-byte vector per
/// lane and 32-chunk step) are independent and overlap. c is the product
/// [rows, n]; width is a multiple of 8.
template <typename T>
__device__ __forceinline__ void
combineToken(const CombineInStore &p, const T *c, int64_t n, int64_t t,
             int64_t n0, int64_t width, int lane) {
  static_assert(kVector<T> == 8, "16-byte vectors of 8 elements");
  const int64_t k = p.routing.topK;
  auto choice = [&](int64_t j, int64_t &row, float &gate) {
    row = keptRow(p.routing, t * k + j);
    gate = row >= 0 ? p.routing.gates[t * k + j] : 0.0f;
  };
  int64_t laneRow = -1;
  float laneGate = 0.0f;
  if (lane < k)
    choice(lane, laneRow, laneGate);
  const int64_t chunks = width / 8;
  for (int64_t base = 0; base < chunks; base += 32) {
    const int64_t col = n0 + (base + lane) * 8;
    const bool mine = base + lane < chunks;
    float sum[8] = {};
#pragma unroll 4
    for (int64_t j = 0; j < k; ++j) {
      int64_t row;
      float gate;
      if (j < 32) {
        row = __shfl_sync(0xffffffffu, laneRow, static_cast<int>(j));
        gate = __shfl_sync(0xffffffffu, laneGate, static_cast<int>(j));
      } else {
        choice(j, row, gate);
      }
      if (row < 0 || !mine)
        continue;
      float v[8];
      loadFromL2<T>(c + row * n + col, v);
#pragma unroll
      for (int i = 0; i < 8; ++i)
        sum[i] = __fadd_rn(sum[i], __fmul_rn(gate, v[i]));
    }
    if (mine)
      storeVector(static_cast<T *>(p.out) + t * n + col, sum);
  }
}

/// The mma.sync kernel's tile (block-wide, after every thread stored its
/// part of rows [row0, row0 + rows) at columns [n0, n0 + width)): each row
/// arrives, and the block sums the tokens whose last row this was. Rows is
/// the tile's row count (a bound on `rows`); width a multiple of 8.
template <typename T, int Rows>
__device__ __forceinline__ void
combineTile(const CombineInStore &p, const T *c, int64_t n, int64_t row0,
            int64_t rows, int64_t n0, int64_t width) {
  __shared__ int64_t finished[Rows];
  __shared__ int count;
  __threadfence(); // this thread's stores, before any arrival counts them
  if (threadIdx.x == 0)
    count = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < rows && i < Rows; i += blockDim.x) {
    int64_t token;
    if (arriveRow(p, row0 + i, n0, token))
      finished[atomicAdd(&count, 1)] = token;
  }
  __syncthreads();
  const int done = count;
  if (done == 0)
    return;
  __threadfence(); // the other tiles' rows, after their arrivals
  // A warp per finished token.
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int i = warp; i < done; i += warps)
    combineToken<T>(p, c, n, finished[i], n0, width, threadIdx.x % 32);
}

/// The wgmma kernel's tile, warp by warp (a row's columns are stored by the
/// 4 lanes of one warp): warp `warp` of its warpgroup stored rows
/// firstRow + 64 h + 16 warp + lane / 4 (+ 8), h < Blocks, of the tile at
/// row0 (rowsValid of them valid), columns [n0, n0 + width). Each row
/// arrives; the warp sums the tokens whose last row it stored.
template <typename T, int Blocks>
__device__ __forceinline__ void
combineWarpRows(const CombineInStore &p, const T *c, int64_t n, int64_t row0,
                int firstRow, int64_t rowsValid, int64_t n0, int64_t width,
                int warp, int lane) {
  __threadfence(); // this lane's stores, before any arrival counts them
  __syncwarp();
  // (Not unrolled: one copy of combineToken keeps the kernel small.)
#pragma unroll 1
  for (int h = 0; h < Blocks; ++h)
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      const int64_t local = firstRow + h * 64 + warp * 16 + lane / 4 + half * 8;
      int64_t token = -1;
      const bool last = lane % 4 == 0 && local < rowsValid &&
                        arriveRow(p, row0 + local, n0, token);
      unsigned mask = __ballot_sync(0xffffffffu, last);
      if (mask)
        __threadfence(); // the other tiles' rows, after their arrivals
      while (mask) {
        const int source = __ffs(mask) - 1;
        mask &= mask - 1;
        combineToken<T>(p, c, n, __shfl_sync(0xffffffffu, token, source), n0,
                        width, lane);
      }
    }
}

/// out's rows of the tokens with no kept choice are zeros (the combine
/// writes them; no tile arrives for them). Threads `first`, `first +
/// stride`, ... of the grid each take one token.
template <typename T>
__device__ __forceinline__ void zeroDroppedTokens(const CombineInStore &p,
                                                  int64_t n, int64_t first,
                                                  int64_t stride) {
  for (int64_t t = first; t < p.routing.tokens; t += stride) {
    if (keptChoices(p.routing, t) != 0)
      continue;
    T *row = static_cast<T *>(p.out) + t * n;
    for (int64_t col = 0; col < n; ++col)
      row[col] = fromFloat<T>(0.0f);
  }
}

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_COMBINEINSTORE_CUH
