//===- HopperWgradKernel.cuh - The wgmma weight gradient ------*- CUDA -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The grouped GEMMs' weight gradient on Hopper's own instructions, ragged in
// K: gradB[g] (+)= A[rows of g]^T gradC[rows of g], ping-pong or
// cooperative, the latter also in clusters of 2 CTAs sharing gradC's tile.
// Built of the forward's pieces (HopperGemmKernel.cuh: the stage layout, the
// tensor maps' encoder, the persistent launch; HopperPrimitives.cuh); CUDA
// headers only. Needs sm_90a: without it every kernel is a trap.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_HOPPERWGRADKERNEL_CUH
#define LIB_RUNTIME_CUDA_HOPPERWGRADKERNEL_CUH

#include "HopperGemmKernel.cuh"

#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>
#include <tuple>

namespace flex::cuda::hopper {

/// What the weight-gradient kernel reads besides its tensor maps.
struct RaggedKParams {
  const int32_t *offsets; ///< device [groups + 1]
  const int32_t *rows;    ///< device [groups]
  int32_t groups;
  int64_t rowBound; ///< rows of A and gradC
  int64_t k, n;     ///< gradB[g] is [k][n]
  void *gradB;
  bool accumulate; ///< gradB += (an expert without rows keeps its value)
};

/// The weight gradient, ragged in K: gradB[g] (+)= A[rows of g]^T
/// gradC[rows of g] for every group g. A CTA tile is 128 rows of gradB[g]
/// (k) by BN columns (n); its reduction walks the group's rows in blocks of
/// 64, A's block M-major (two 64-column TMA boxes) and gradC's N-major. The
/// last block of a group reaches into the next group's rows: its consumer
/// zeroes both operands' rows past the group before multiplying. Persistent and
/// ping-pong (a warpgroup owns a tile whole, so the zeroing needs only its
/// own barrier); tiles walk groups, then M, then N. With PingPong false both
/// warpgroups share each tile (64 rows of gradB each), so a 128 x 256 tile
/// fits their registers and reads a third less per product than 128 x 128;
/// the zeroing then syncs both. Cluster 2 (cooperative only): the CTAs of
/// a cluster take M tiles of one group and the same columns side by side,
/// each multicasting half of gradC's tile into both (raggedMKernel's
/// protocol; each CTA zeroes its own copy's rows past the group).
template <typename T, int BN, int Stages, bool PingPong = true, int Cluster = 1>
__global__ void __launch_bounds__(kThreads, 1)
    raggedKKernel(const __grid_constant__ CUtensorMap mapA,
                  const __grid_constant__ CUtensorMap mapGradC,
                  RaggedKParams p) {
#ifndef FLEX_HOPPER_GEMM
  __trap();
#else
  using L = Layout<BN, Stages>;
  extern __shared__ __align__(1024) unsigned char sharedRaw[];
  unsigned char *shared = reinterpret_cast<unsigned char *>(
      (reinterpret_cast<uintptr_t>(sharedRaw) + 1023) & ~uintptr_t(1023));
  const uint32_t stages = smemAddress(shared);
  const uint32_t fullBars = stages + Stages * L::StageBytes;
  const uint32_t emptyBars = fullBars + Stages * 8;
  const uint32_t orderBars = emptyBars + Stages * 8;
  constexpr int ChunkBytes = kTileK * 128; // 64 rows of 128 bytes

  static_assert(Cluster == 1 || (Cluster == 2 && !PingPong),
                "clusters of 2 CTAs run the cooperative tiles");
  using Registers =
      RegisterSplit<(Cluster > 1 ? 56 : 40), (Cluster > 1 ? 224 : 232)>;
  // M tiles in groups of Cluster (a cluster's CTAs side by side).
  const int32_t mTiles =
      static_cast<int32_t>((p.k + kTileM * Cluster - 1) / (kTileM * Cluster));
  const int32_t nTiles = static_cast<int32_t>((p.n + BN - 1) / BN);
  const int64_t perGroup = int64_t(mTiles) * nTiles;
  const int64_t tiles = perGroup * p.groups;
  const uint32_t rank = Cluster > 1 ? clusterRank() : 0;
  const int64_t cluster = blockIdx.x / Cluster, clusters = gridDim.x / Cluster;
  // The group, first row, rows and M / N origin of tile t (this CTA's M
  // tile of the cluster's; past k for the second CTA where k has an odd
  // number of 128-row tiles:
  // it loads zeros and stores nothing).
  auto tileOf = [&](int64_t t, int32_t &g, int64_t &first, int64_t &count,
                    int32_t &m0, int32_t &n0) {
    g = static_cast<int32_t>(t / perGroup);
    const int64_t rem = t % perGroup;
    m0 = (static_cast<int32_t>(rem % mTiles) * Cluster +
          static_cast<int32_t>(rank)) *
         kTileM;
    n0 = static_cast<int32_t>(rem / mTiles) * BN;
    first = p.offsets[g];
    count = detail::groupRows(p.offsets, p.rows, -1, g, p.rowBound);
  };

  setUpStageBarriers<Stages, Cluster>(fullBars, emptyBars, orderBars, 1,
                                      PingPong ? 4 : 8);

  const int warpGroup = threadIdx.x / 128;
  if (warpGroup == 0) {
    Registers::producer();
    if (threadIdx.x != 0)
      return;
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&mapA) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&mapGradC) : "memory");
    uint32_t step = 0;
    for (int64_t t = cluster; t < tiles; t += clusters) {
      int32_t g, m0, n0;
      int64_t first, count;
      tileOf(t, g, first, count, m0, n0);
      const int kTiles = static_cast<int>((count + kTileK - 1) / kTileK);
      for (int kt = 0; kt < kTiles; ++kt, ++step) {
        const uint32_t s = step % Stages, phase = (step / Stages) & 1;
        barrierWait<(Cluster > 1)>(emptyBars + 8 * s, phase ^ 1);
        const uint32_t full = fullBars + 8 * s;
        barrierExpectBytes(full, L::StageBytes);
        const uint32_t a = stages + s * L::StageBytes, b = a + L::ABytes;
        const int32_t row = static_cast<int32_t>(first) + kt * kTileK;
        tmaLoad2d(a, &mapA, full, m0, row);
        tmaLoad2d(a + ChunkBytes, &mapA, full, m0 + 64, row);
        // gradC's tile: this CTA's share of its 64-column boxes, into
        // every CTA of the cluster.
        constexpr int Boxes = BN / 64 / Cluster;
#pragma unroll
        for (int j = 0; j < Boxes; ++j) {
          const int box = static_cast<int>(rank) * Boxes + j;
          if constexpr (Cluster > 1)
            tmaLoad2dMulticast(b + box * ChunkBytes, &mapGradC, full,
                               n0 + 64 * box, row, (1u << Cluster) - 1);
          else
            tmaLoad2d(b + box * ChunkBytes, &mapGradC, full, n0 + 64 * box,
                      row);
        }
      }
    }
    if constexpr (Cluster > 1)
      waitOutTheCluster<Stages>(emptyBars, step);
    return;
  }

  Registers::consumer();
  const int consumer = warpGroup - 1;
  const int t128 = threadIdx.x % 128, warp = t128 / 32, lane = t128 % 32;
  T *gradB = static_cast<T *>(p.gradB);
  uint32_t step = 0;
  // Ping-pong: a warpgroup's tile is both 64-row halves of gradB's tile
  // (A's two boxes); cooperative: warpgroup c takes half c.
  constexpr int Blocks = PingPong ? 2 : 1;
  const int firstBox = PingPong ? 0 : consumer;
  constexpr int ZeroingThreads = PingPong ? 128 : 256;
  const int zeroingThread = PingPong ? t128 : threadIdx.x - 128;
  float acc[Blocks][BN / 2];
  int64_t mine = 0;
  for (int64_t t = cluster; t < tiles; t += clusters, ++mine) {
    int32_t g, m0, n0;
    int64_t first, count;
    tileOf(t, g, first, count, m0, n0);
    const int kTiles = static_cast<int>((count + kTileK - 1) / kTileK);
    if (PingPong && (mine & 1) != consumer) {
      step += kTiles; // the other warpgroup's tile
      continue;
    }
    if constexpr (PingPong)
      waitForThePreviousTile(orderBars, consumer, mine);
    zeroAccumulators(acc);
    for (int kt = 0; kt < kTiles; ++kt, ++step) {
      const uint32_t s = step % Stages;
      barrierWait(fullBars + 8 * s, (step / Stages) & 1);
      const uint32_t a = stages + s * L::StageBytes, b = a + L::ABytes;
      const int valid = static_cast<int>(count - int64_t(kt) * kTileK);
      if (valid < kTileK) {
        // Rows past the group (the next group's): zeros in A and in gradC
        // (a NaN there would survive a zero in the other operand). The
        // stage is 2 + BN / 64 chunks of 64 rows of 128 bytes, A's first;
        // the swizzle moves 16-byte pieces within a row, never across.
        unsigned char *stage = shared + s * L::StageBytes;
        const int pieces = (kTileK - valid) * 8;
        for (int i = zeroingThread; i < (2 + BN / 64) * pieces;
             i += ZeroingThreads) {
          const int chunk = i / pieces, piece = i % pieces;
          *reinterpret_cast<uint4 *>(stage + chunk * ChunkBytes + valid * 128 +
                                     piece * 16) = make_uint4(0, 0, 0, 0);
        }
        // Visible to wgmma (the async proxy) before any thread issues it:
        // the warpgroup's own barrier (1 or 2), or both warpgroups' (3).
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("bar.sync %0, %1;\n" ::"r"(PingPong ? 1 + consumer : 3),
                     "n"(ZeroingThreads)
                     : "memory");
      }
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        // Both operands M/N-major: 16 reduction rows are 2048 bytes.
        const uint64_t db = descriptor(b + kk * 16 * 128, ChunkBytes, 1024);
#pragma unroll
        for (int h = 0; h < Blocks; ++h)
          Wgmma<T, BN>::template run<1, 1>(
              acc[h],
              descriptor(a + (firstBox + h) * ChunkBytes + kk * 16 * 128,
                         ChunkBytes, 1024),
              db);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
      if (kt > 0)
        releaseStage<Cluster>(emptyBars, (step - 1) % Stages, lane);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    if (kTiles > 0)
      releaseStage<Cluster>(emptyBars, (step - 1) % Stages, lane);
    if (PingPong && t128 == 0)
      barrierArrive(orderBars + 8 * consumer); // this tile's stages are in
    if (p.accumulate && kTiles == 0)
      continue; // an expert without rows keeps its gradient
    T *out = gradB + int64_t(g) * p.k * p.n;
#pragma unroll
    for (int h = 0; h < Blocks; ++h)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row =
            m0 + (firstBox + h) * 64 + warp * 16 + lane / 4 + half * 8;
        if (row >= p.k)
          continue;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int64_t col = n0 + 8 * j + 2 * (lane % 4);
          if (col >= p.n)
            continue;
          T *at = out + row * p.n + col;
          float v0 = acc[h][4 * j + 2 * half],
                v1 = acc[h][4 * j + 2 * half + 1];
          if (p.accumulate) {
            v0 += float(at[0]);
            v1 += float(at[1]);
          }
          storePair(at, v0, v1);
        }
      }
  }
#endif
}

/// The weight gradient's tensor maps: A as [rowBound][k] and gradC as
/// [rowBound][n], both in boxes of 64 rows x 64 columns.
inline CUresult makeRaggedKMaps(CUtensorMap &mapA, CUtensorMap &mapGradC,
                                bool bf16, const void *a, const void *gradC,
                                int64_t rowBound, int64_t k, int64_t n) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensorMapEncoder();
  if (!encode)
    return CUDA_ERROR_NOT_SUPPORTED;
  const cuuint32_t unit[2] = {1, 1};
  const cuuint32_t box[2] = {64, 64};
  CUresult r = CUDA_SUCCESS;
  for (auto [map, base, width] :
       {std::tuple{&mapA, a, k}, std::tuple{&mapGradC, gradC, n}}) {
    const cuuint64_t dims[2] = {cuuint64_t(width), cuuint64_t(rowBound)};
    const cuuint64_t strides[1] = {cuuint64_t(width) * 2};
    r = encode(map,
               bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                    : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
               2, const_cast<void *>(base), dims, strides, box, unit,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
      return r;
  }
  return r;
}

/// One persistent launch of the weight-gradient kernel.
template <typename T, int BN, int Stages, bool PingPong = true, int Cluster = 1>
cudaError_t launchRaggedK(const CUtensorMap &mapA, const CUtensorMap &mapGradC,
                          const RaggedKParams &p, int ctas,
                          cudaStream_t stream) {
  constexpr auto kernel = raggedKKernel<T, BN, Stages, PingPong, Cluster>;
  constexpr int bytes = Layout<BN, Stages>::SharedBytes;
  const int64_t bound = ((p.k + kTileM * Cluster - 1) / (kTileM * Cluster)) *
                        ((p.n + BN - 1) / BN) * int64_t(p.groups);
  return launchPersistent<Cluster, kernel>(bytes, bound, ctas, stream, false,
                                           mapA, mapGradC, p);
}

} // namespace flex::cuda::hopper

#endif // LIB_RUNTIME_CUDA_HOPPERWGRADKERNEL_CUH
