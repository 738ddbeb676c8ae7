//===- HopperGemmKernel.cuh - wgmma + TMA grouped GEMMs -*- CUDA -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The grouped GEMMs on Hopper's own instructions: TMA loads the operand
// tiles into 128-byte-swizzled shared memory, one producer warp(group)
// feeds a ring of stages through mbarriers, and two consumer warpgroups
// multiply with wgmma (bf16/f16 in, fp32 accumulate). The groups' rows are
// read on the device as DeviceGroupedGemm.cu's kernel reads them: no host
// read, one persistent launch, capturable in a graph.
//  - raggedMKernel: C[rows of g, n] (+)= A[rows of g, k] @ B[g] (forward and
//    input gradient), cooperative or ping-pong, optionally the SwiGLU first
//    layer (Glu), a gathered A (Gather), bias / pre / activation in the
//    store, and in clusters of 2 CTAs sharing B's tile (TMA multicast);
//  - its store (StoreMode), straight from the accumulators or staged
//    through shared memory (stagedStore);
//  - what both it and the weight gradient (HopperWgradKernel.cuh's
//    raggedKKernel) launch with: the stage layout, the tensor maps, the
//    persistent launch in clusters.
// Every wait on a barrier gives up after 20 s (a trap, not a hang), and the
// producer / consumer register split is checked against the CTA's budget
// (RegisterSplit).
//
// CUDA headers only (GroupTiles.cuh, Activations.cuh; no runtime types), so
// that a standalone driver can include it; HopperGroupedGemm.cu is the
// runtime's side. Needs sm_90a: without it (__CUDA_ARCH_FEAT_SM90_ALL
// undefined) every kernel is a trap.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_HOPPERGEMMKERNEL_CUH
#define LIB_RUNTIME_CUDA_HOPPERGEMMKERNEL_CUH

#include "Activations.cuh"
#include "CombineInStore.cuh"
#include "DependentLaunch.cuh"
#include "GroupTiles.cuh"
#include "HopperPrimitives.cuh"

#include <atomic>
#include <cstdint>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tuple>
#include <type_traits>

namespace flex::cuda::hopper {

/// A consumer warp's staging area for a staged store: 16 rows x 64 fp32
/// columns (4 KB), so the 8 consumer warps take 32 KB.
constexpr int kStagingRows = 16, kStagingColumns = 64;
constexpr int kStagingBytes = 8 * kStagingRows * kStagingColumns * 4;
/// The most dynamic shared memory a CTA may ask for on sm_90 (227 KB).
constexpr int kMaxSharedBytes = 232448;

template <int BN, int Stages, bool Staged = false> struct Layout {
  static constexpr int ABytes = kTileM * kTileK * 2;
  static constexpr int BBytes = BN * kTileK * 2;
  static constexpr int StageBytes = ABytes + BBytes;
  static constexpr int StagingBytes = Staged ? kStagingBytes : 0;
  /// Stages, the consumer warps' staging areas (a staged store), then the
  /// full and empty barriers and the ping-pong order's two; 1024 bytes of
  /// slack to align the stages to the swizzle's 1024-byte period.
  static constexpr int SharedBytes =
      Stages * StageBytes + StagingBytes + (2 * Stages + 2) * 8 + 1024;
  static_assert(ABytes % 1024 == 0 && BBytes % 1024 == 0);
  static_assert(SharedBytes <= kMaxSharedBytes,
                "the stages and the staging area exceed a CTA's shared memory");
};

/// Rows of 128-row M tiles per raster band by default: consecutive tiles
/// walk a band's M tiles first, then its N tiles, so the CTAs running at
/// once share B's column tiles and a band's A rows (a weight too large for
/// L2 is then read about once per band instead of once per M tile).
constexpr int32_t kRasterM = 8;

/// What the kernel reads besides the two tensor maps.
struct RaggedMParams {
  const int32_t *offsets; ///< device [groups + 1]: each group's first row
  const int32_t *rows;    ///< device [groups]
  int32_t groups;
  int64_t rowBound;       ///< rows of A and C
  int64_t staticCapacity; ///< C of a fixed capacity (offsets unused), or -1
  int64_t k, n;
  void *c;
  bool accumulate; ///< c += product (one rounding of the fp32 sum)
  /// The GLU kernel (Glu): the rounded products' copies, or null.
  void *gateOut = nullptr, *upOut = nullptr;
  /// A gathered A (Gather): A's row r is row rowTokens[r] of `a` ([tokens,
  /// k]), zeros for a token outside [0, tokens).
  const void *a = nullptr;
  const int32_t *rowTokens = nullptr;
  int64_t tokens = 0;
  /// StoreMode::BiasActivation: the product rounded to T, plus biasScale *
  /// bias[g] (bias [groups][n], or null), that value into `pre` (like c, or
  /// null), then the activation into c: bit for bit applyGemmEpilogue
  /// after the store.
  const void *bias = nullptr;
  void *pre = nullptr;
  float biasScale = 1.0f;
  /// StoreMode::ActivationBackward: c = the product rounded to T times
  /// act'(activationInput) (like c), as activationBackward computes it.
  const void *activationInput = nullptr;
  /// StoreMode::GluBackward: with d the product rounded to T and gate, up
  /// read from gluGate / gluUp (like c), c = d * up * silu'(gate)
  /// (grad_gate_in) and gluGradUp = d * silu(gate) (grad_up_in), as
  /// gluBackward computes them.
  const void *gluGate = nullptr, *gluUp = nullptr;
  void *gluGradUp = nullptr;
  /// Combine (a template argument): the tile that stores a token's last
  /// kept row sums the token into combine.out (CombineInStore.cuh).
  detail::CombineInStore combine;
  /// M tiles per raster band (kRasterM; FLEX_WGMMA_RASTER sets it to
  /// measure others); below two cluster tiles, one M tile a band.
  int32_t rasterM = kRasterM;
};

/// Group g's rows (GroupTiles.cuh's groupRows over this problem's space).
__device__ __forceinline__ int64_t groupRowsOf(const RaggedMParams &p,
                                               int64_t g) {
  return detail::groupRows(p.offsets, p.rows, p.staticCapacity, g, p.rowBound);
}

/// M tiles of TileRows rows of every group (the real count, read on the
/// device): each warp sums it itself.
template <int TileRows>
__device__ __forceinline__ int64_t totalMTiles(const RaggedMParams &p) {
  const int lane = threadIdx.x % 32;
  int64_t total = 0;
  for (int32_t g = lane; g < p.groups; g += 32)
    total += (groupRowsOf(p, g) + TileRows - 1) / TileRows;
#pragma unroll
  for (int d = 16; d > 0; d /= 2)
    total += __shfl_xor_sync(0xffffffffu, total, d);
  return total;
}

/// One tile of the sequence: its group, first row, rows inside the group
/// and first column. Every warp computes it itself.
struct TileWork {
  int32_t group;
  int64_t row0, rowsValid;
  int32_t n0;
};
/// Tile t of the sequence of a cluster of Cluster CTAs along M: Cluster M
/// tiles of one group and the same columns, so the cluster shares B's
/// tile. CTA `rank` takes the rank-th 128 rows (rowsValid <= 0 where the
/// group ends before them).
template <int Cluster>
__device__ __forceinline__ TileWork tileAt(const RaggedMParams &p, int64_t t,
                                           int64_t mTiles, int32_t nTiles,
                                           int bn, uint32_t rank) {
  constexpr int64_t TileRows = kTileM * Cluster;
  // (A band of one M tile walks each M tile's columns in turn: the CTAs
  // running together read the same rows of B.)
  const int64_t BandM = p.rasterM >= 2 * Cluster ? p.rasterM / Cluster : 1;
  const int64_t bandTiles = BandM * nTiles;
  const int64_t band = t / bandTiles, local = t % bandTiles;
  const int64_t firstM = band * BandM;
  const int64_t bandRows = mTiles - firstM < BandM ? mTiles - firstM : BandM;
  const int64_t m = firstM + local % bandRows;
  TileWork w;
  w.n0 = static_cast<int32_t>(local / bandRows) * bn;
  int64_t firstTile = 0;
  w.group = detail::findGroupTile<TileRows>(p.offsets, p.rows, p.staticCapacity,
                                            p.groups, p.rowBound, m, firstTile);
  const int64_t rowInGroup = (m - firstTile) * TileRows + rank * kTileM;
  w.row0 =
      detail::groupFirst(p.offsets, p.staticCapacity, w.group) + rowInGroup;
  w.rowsValid = groupRowsOf(p, w.group) - rowInGroup;
  return w;
}

/// Persistent: each CTA takes tiles blockIdx.x, blockIdx.x + gridDim.x, ...
/// of the rastered sequence; the producer runs ahead across tiles, so the
/// next tile's first stages load while the consumers store this one.
/// BKMajor: B[g] is [N][K] (the input gradient's w^T), else [K][N].
/// PingPong: the two consumer warpgroups take alternate tiles (each all
/// 128 rows), one's store overlapping the other's products; else both work
/// on each tile (64 rows each).
/// Cluster 2: the CTAs of a cluster take M tiles of one group side by side
/// and each loads half of B's tile into both (TMA multicast), halving B's
/// reads from L2; a stage is refilled once both CTAs' consumers released
/// it (their empty barriers count the cluster's consumer warps).
/// What a forward tile's store applies to the product (template arguments,
/// with the activation, so each kernel holds one epilogue's code: with
/// every epilogue branching per element in the unrolled store, the kernels
/// grew 5-8x and missed the instruction cache (Runs 34 and 35: 1.5-2.2x
/// slower); a runtime loop rereading the stored tile instead waited on L2
/// per element pair (Run 36: the fused store still 1.5x GEMM + pass)).
enum class StoreMode {
  Plain,              ///< c = (c +) the product
  BiasActivation,     ///< RaggedMParams' bias / pre, activation Act
                      ///< (Epilogue's value)
  ActivationBackward, ///< times act'(activationInput), Act: Activation's
  GluBackward,        ///< the GLU's backward
};

/// Whether a forward tile's store goes through shared memory: each consumer
/// warp stages 16 rows x 64 columns of its fp32 values, then writes them
/// as whole 16-byte pieces of rows (a warp's store covers 4 rows of 128
/// bytes). Stored straight from the accumulators' layout, a warp's store
/// writes 8 rows x 16 bytes, half sectors: the profile of C3's fc1 (2026-12-07)
/// showed twice cuBLAS's L2 write sectors and the L2 the busiest unit. The
/// GLU's three outputs, the GLU backward's two and the combine (which
/// rereads the stored rows) keep the direct store; DirectStore keeps it
/// everywhere (FLEX_WGMMA_STORE=direct, to measure the difference).
constexpr bool stagedStore(bool glu, StoreMode store, bool combine,
                           bool directStore) {
  return !glu && !combine && store != StoreMode::GluBackward && !directStore;
}

#ifdef FLEX_HOPPER_GEMM
/// What Store reads beside the product at (row `at` / n, col), two
/// adjacent columns: the bias (BiasActivation with a bias) or the
/// forward's pre-activation values (ActivationBackward); zeros otherwise.
template <typename T, StoreMode Store>
__device__ __forceinline__ float2 pairInput(const RaggedMParams &p, int64_t at,
                                            int64_t col, const T *bias) {
  float2 in{0.0f, 0.0f};
  if constexpr (Store == StoreMode::ActivationBackward)
    loadPair(static_cast<const T *>(p.activationInput) + at + col, in.x, in.y);
  else if constexpr (Store == StoreMode::BiasActivation)
    if (bias)
      loadPair(bias + col, in.x, in.y);
  return in;
}

/// A forward tile's value at (row `at` / n, col), from the fp32 product in
/// v0, v1 (two adjacent columns) and pairInput's `in`, as Store computes
/// it; the side outputs (`pre`) are stored here. Not the GLU's or its
/// backward's.
template <typename T, StoreMode Store, int Act>
__device__ __forceinline__ void finishPair(const RaggedMParams &p, int64_t at,
                                           int64_t col, const T *bias,
                                           float2 in, float &v0, float &v1) {
  if constexpr (Store == StoreMode::ActivationBackward) {
    // As activationBackward: the stored product times the derivative at
    // the forward's pre-activation value.
    v0 = toStored<T>(v0) * detail::activationDerivative(Act, in.x);
    v1 = toStored<T>(v1) * detail::activationDerivative(Act, in.y);
  } else if constexpr (Store == StoreMode::BiasActivation) {
    // As applyGemmEpilogue: from the stored product, fp32 math.
    v0 = toStored<T>(v0);
    v1 = toStored<T>(v1);
    if (bias) {
      v0 = __fadd_rn(v0, __fmul_rn(in.x, p.biasScale));
      v1 = __fadd_rn(v1, __fmul_rn(in.y, p.biasScale));
    }
    if (p.pre)
      storePair(static_cast<T *>(p.pre) + at + col, v0, v1);
    v0 = detail::applyEpilogue(Act, v0);
    v1 = detail::applyEpilogue(Act, v1);
  }
}

/// A staged store's second half: the warp's 16 staged rows x 64 columns
/// (at shared address `stage`, columns swizzled by row so neither half
/// conflicts on banks)
/// into c's rows row0 + local0 + r (r < 16; those at or past rowsValid
/// skipped), columns col0 .. col0 + 63 (those at or past n skipped), 8
/// columns (16 bytes) per store where c's rows allow it; `accumulate` adds
/// c's value to the fp32 one before the one rounding.
template <typename T>
__device__ __forceinline__ void
copyStagedRows(uint32_t stage, T *c, int64_t n, int64_t row0, int64_t local0,
               int64_t rowsValid, int64_t col0, bool vectors, bool accumulate,
               int lane) {
  const int g = lane % 8;
#pragma unroll
  for (int i = 0; i < kStagingRows / 4; ++i) {
    const int r = lane / 8 + 4 * i;
    const int64_t col = col0 + 8 * g;
    if (local0 + r >= rowsValid || col >= n)
      continue;
    // Group g of row r lies at group g ^ (r % 4); lanes 4-7 of a phase
    // read its halves in the other order (banks 4-7 of each 8).
    const uint32_t from = stage + 4 * (r * kStagingColumns + 8 * (g ^ (r % 4)));
    const int first = (g >> 2) & 1;
    float v[8];
    const float4 x = loadShared(from + 16 * first);
    const float4 y = loadShared(from + 16 * (1 - first));
    const float4 lo = first ? y : x, hi = first ? x : y;
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
    v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    T *out = c + (row0 + local0 + r) * n + col;
    if (vectors && col + 8 <= n) {
      if (accumulate) {
        const uint4 old = *reinterpret_cast<const uint4 *>(out);
        const T *o = reinterpret_cast<const T *>(&old);
#pragma unroll
        for (int e = 0; e < 8; ++e)
          v[e] += float(o[e]);
      }
      uint4 packed;
      T *q = reinterpret_cast<T *>(&packed);
#pragma unroll
      for (int e = 0; e < 8; e += 2)
        storePair(q + e, v[e], v[e + 1]);
      *reinterpret_cast<uint4 *>(out) = packed;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (col + e < n) {
          float x = v[e];
          if (accumulate)
            x += float(out[e]);
          out[e] = T(x);
        }
    }
  }
}
/// The inputs Store reads beside the product for one staged chunk (the
/// lane's 2 rows `first` + lane / 4 (+ 8), 8 column pairs from col0),
/// zeros where none: all loaded before the chunk's first staging write,
/// whose "memory" clobber (and the `pre` stores, which may alias) would
/// order each load after the write before it, one load latency per pair
/// (C3's fused bias + ReLU took 1106 us against 894 for the plain store,
/// bench/RESULTS.md Run 43). The bias is one row for both halves.
template <typename T, StoreMode Store>
__device__ __forceinline__ void
chunkInputs(const RaggedMParams &p, const TileWork &w, int64_t first,
            int64_t col0, const T *bias, int lane,
            float2 (&in)[2][kStagingColumns / 8]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = lane / 4 + half * 8;
    const int64_t at = (w.row0 + first + r) * p.n;
#pragma unroll
    for (int jj = 0; jj < kStagingColumns / 8; ++jj) {
      const int64_t col = col0 + 8 * jj + 2 * (lane % 4);
      in[half][jj] = float2{0.0f, 0.0f};
      if constexpr (Store == StoreMode::BiasActivation) {
        if (half == 0 && col < p.n)
          in[0][jj] = pairInput<T, Store>(p, at, col, bias);
        else if (half == 1)
          in[1][jj] = in[0][jj];
      } else if constexpr (Store == StoreMode::ActivationBackward) {
        if (first + r < w.rowsValid && col < p.n)
          in[half][jj] = pairInput<T, Store>(p, at, col, bias);
      }
    }
  }
}

/// A staged store of one warp's part of a tile (stagedStore): its rows
/// local0 + 64 h + r (r < 16, h < Blocks) of the tile `w`, 64 columns at a
/// time - its values into its staging area at shared address `stage`
/// (column c of row r at c ^ 8 (r % 4): no bank conflicts), then out as
/// whole row pieces (copyStagedRows).
template <typename T, int BN, int Blocks, StoreMode Store, int Act>
__device__ __forceinline__ void
storeTileStaged(const RaggedMParams &p, const TileWork &w,
                const float (&acc)[Blocks][BN / 2], uint32_t stage,
                int64_t local0, int lane) {
  T *c = static_cast<T *>(p.c);
  const bool vectors = p.n % 8 == 0 && reinterpret_cast<uintptr_t>(c) % 16 == 0;
  const bool accumulate = Store == StoreMode::Plain && p.accumulate;
  const T *bias = Store == StoreMode::BiasActivation && p.bias
                      ? static_cast<const T *>(p.bias) + int64_t(w.group) * p.n
                      : nullptr;
#pragma unroll
  for (int h = 0; h < Blocks; ++h) {
    const int64_t first = local0 + h * 64;
#pragma unroll
    for (int chunk = 0; chunk < BN / kStagingColumns; ++chunk) {
      const int64_t col0 = w.n0 + chunk * kStagingColumns;
      if (col0 >= p.n || first >= w.rowsValid)
        continue; // (the same for the whole warp)
      float2 in[2][kStagingColumns / 8];
      chunkInputs<T, Store>(p, w, first, col0, bias, lane, in);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = lane / 4 + half * 8;
        const int64_t at = (w.row0 + first + r) * p.n;
        const bool rowValid = first + r < w.rowsValid;
#pragma unroll
        for (int jj = 0; jj < kStagingColumns / 8; ++jj) {
          const int j = chunk * (kStagingColumns / 8) + jj;
          const int64_t col = col0 + 8 * jj + 2 * (lane % 4);
          float v0 = acc[h][4 * j + 2 * half],
                v1 = acc[h][4 * j + 2 * half + 1];
          if (rowValid && col < p.n)
            finishPair<T, Store, Act>(p, at, col, bias, in[half][jj], v0, v1);
          const int column = (8 * jj + 2 * (lane % 4)) ^ (8 * (r % 4));
          storeShared(stage + 4 * (r * kStagingColumns + column), v0, v1);
        }
      }
      __syncwarp();
      copyStagedRows<T>(stage, c, p.n, w.row0, first, w.rowsValid, col0,
                        vectors, accumulate, lane);
      __syncwarp(); // (read before the next chunk overwrites it)
    }
  }
}
#endif // FLEX_HOPPER_GEMM

template <typename T, int BN, int Stages, bool BKMajor, bool PingPong,
          bool Glu = false, bool Gather = false, int Cluster = 1,
          StoreMode Store = StoreMode::Plain, int Act = 0, bool Combine = false,
          bool DirectStore = false>
__global__ void __launch_bounds__(kThreads, 1)
    raggedMKernel(const __grid_constant__ CUtensorMap mapA,
                  const __grid_constant__ CUtensorMap mapB,
                  const __grid_constant__ CUtensorMap mapUp, RaggedMParams p) {
  static_assert(!Glu || !BKMajor,
                "the GLU tile pairs BN / 2 gate and the same up columns of "
                "[K][N] weights");
  static_assert(Cluster == 1 || Cluster == 2, "clusters of 1 or 2 CTAs");
  // A gathered A's producer warpgroup copies rows (72 registers), a
  // cluster's producer multicasts (56); a TMA-only one keeps 40. (Fewer
  // spill, checked with ptxas -v.)
  using Registers = RegisterSplit<Gather ? 72 : (Cluster > 1 ? 56 : 40),
                                  Gather ? 216 : (Cluster > 1 ? 224 : 232)>;
  // Output columns per tile (the GLU tile's B holds two products' columns).
  constexpr int TileN = Glu ? BN / 2 : BN;
  constexpr bool Staged = stagedStore(Glu, Store, Combine, DirectStore);
#ifndef FLEX_HOPPER_GEMM
  __trap();
#else
  using L = Layout<BN, Stages, Staged>;
  extern __shared__ __align__(1024) unsigned char sharedRaw[];
  unsigned char *shared = reinterpret_cast<unsigned char *>(
      (reinterpret_cast<uintptr_t>(sharedRaw) + 1023) & ~uintptr_t(1023));
  const uint32_t stages = smemAddress(shared);
  const uint32_t staging = stages + Stages * L::StageBytes;
  const uint32_t fullBars = stages + Stages * L::StageBytes + L::StagingBytes;
  const uint32_t emptyBars = fullBars + Stages * 8;
  const uint32_t orderBars = emptyBars + Stages * 8;

  // A dependent launch (DependentLaunch.cuh) waits here, before the first
  // read of the groups' rows.
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  const int64_t mTiles = totalMTiles<kTileM * Cluster>(p);
  const int32_t nTiles = static_cast<int32_t>((p.n + TileN - 1) / TileN);
  const int64_t tiles = mTiles * nTiles;
  const int kTiles = static_cast<int>((p.k + kTileK - 1) / kTileK);
  // The cluster's tiles: tile t goes to cluster t % clusters.
  const uint32_t rank = Cluster > 1 ? clusterRank() : 0;
  const int64_t cluster = blockIdx.x / Cluster, clusters = gridDim.x / Cluster;

  // A full barrier counts the producer thread's expected bytes, and with a
  // gathered A each producer thread's copies (cp.async.mbarrier.arrive.noinc);
  // a ping-pong stage is one warpgroup's, else both's.
  setUpStageBarriers<Stages, Cluster>(fullBars, emptyBars, orderBars,
                                      Gather ? 1 + 128 : 1, PingPong ? 4 : 8);

  const int warpGroup = threadIdx.x / 128;
  if (warpGroup == 0) {
    // The producer: warp 0 walks the tiles, its lane 0 issues the TMA
    // loads; with a gathered A every producer thread also copies 16-byte
    // piece threadIdx % 8 of rows threadIdx / 8 + 16 j (j < 8) of A's tile
    // per stage, so a warp's copy reads 4 whole 128-byte rows (cp.async into
    // the 128-byte swizzle TMA would write: piece c of row r at piece
    // c ^ (r % 8)).
    Registers::producer();
    if (!Gather && threadIdx.x >= 32)
      return;
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(&mapA) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(&mapB) : "memory");
      if constexpr (Glu)
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(&mapUp) : "memory");
    }
    const T *aRows = static_cast<const T *>(p.a);
    uint32_t step = 0; // k blocks loaded so far, over all tiles
    for (int64_t t = cluster; t < tiles; t += clusters) {
      const TileWork w = tileAt<Cluster>(p, t, mTiles, nTiles, TileN, rank);
      // Gather: the tokens of this thread's 8 rows, -1 for a row past the
      // group or a token outside [0, tokens) (32-bit: the producer's 72
      // registers).
      constexpr int kGatherRows = Gather ? 8 : 1;
      const int piece = threadIdx.x % 8;
      int32_t source[kGatherRows];
      if constexpr (Gather) {
#pragma unroll
        for (int j = 0; j < kGatherRows; ++j) {
          const int r = threadIdx.x / 8 + 16 * j;
          source[j] = -1;
          if (r < w.rowsValid) {
            const int32_t token = p.rowTokens[w.row0 + r];
            if (token >= 0 && token < p.tokens)
              source[j] = token;
          }
        }
      }
      if (Gather || threadIdx.x == 0) {
        for (int kt = 0; kt < kTiles; ++kt, ++step) {
          const uint32_t s = step % Stages, phase = (step / Stages) & 1;
          barrierWait<(Cluster > 1)>(emptyBars + 8 * s, phase ^ 1);
          const uint32_t full = fullBars + 8 * s;
          const uint32_t a = stages + s * L::StageBytes, b = a + L::ABytes;
          const int32_t k0 = kt * kTileK;
          if constexpr (Gather) {
            // Row r's piece lands at piece ^ (r % 8); r % 8 is the same
            // for all j.
            const uint32_t dst = a + (threadIdx.x / 8) * 128 +
                                 ((piece ^ ((threadIdx.x / 8) % 8)) * 16);
            const int64_t column = k0 + 8 * piece;
            const bool inK = column < p.k;
#pragma unroll
            for (int j = 0; j < kGatherRows; ++j) {
              const bool valid = inK && source[j] >= 0;
              const T *src =
                  valid ? aRows + int64_t(source[j]) * p.k + column : aRows;
              asm volatile(
                  "cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                      dst + j * 16 * 128),
                  "l"(src), "r"(valid ? 16 : 0)
                  : "memory");
            }
          }
          if (threadIdx.x == 0) {
            barrierExpectBytes(full, Gather ? L::BBytes : L::StageBytes);
            if constexpr (!Gather)
              tmaLoad2d(a, &mapA, full, k0, static_cast<int32_t>(w.row0));
            // B's tile: a K-major one is one box of BN / Cluster rows per
            // CTA; an N-major one is BN / 64 boxes of 64 columns (GLU: the
            // gate's BN / 2 columns, then up's same ones). In a cluster,
            // each CTA loads the rank-th part into every CTA (multicast).
            constexpr uint16_t everyCta = (1u << Cluster) - 1;
            constexpr int Part = BN / Cluster;
            if constexpr (BKMajor) {
              if constexpr (Cluster > 1)
                tmaLoad3dMulticast(b + rank * Part * 128, &mapB, full, k0,
                                   w.n0 + rank * Part, w.group, everyCta);
              else
                tmaLoad3d(b, &mapB, full, k0, w.n0, w.group);
            } else {
#pragma unroll
              for (int j = 0; j < Part / 64; ++j) {
                const int box = rank * (Part / 64) + j;
                const CUtensorMap *map = &mapB;
                int32_t column = w.n0 + 64 * box;
                if constexpr (Glu) { // boxes past BN / 128: up's (in a
                                     // cluster of 2: the second CTA's)
                  const bool up = Cluster > 1 ? rank != 0 : j >= BN / 128;
                  map = up ? &mapUp : &mapB;
                  column = w.n0 + 64 * (Cluster > 1 ? j : j % (BN / 128));
                }
                if constexpr (Cluster > 1)
                  tmaLoad3dMulticast(b + box * (kTileK * 128), map, full,
                                     column, k0, w.group, everyCta);
                else
                  tmaLoad3d(b + box * (kTileK * 128), map, full, column, k0,
                            w.group);
              }
            }
          }
          if constexpr (Gather)
            asm volatile(
                "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                    full)
                : "memory");
        }
      }
      __syncwarp();
    }
    // A thread's last copies (and the arrive they carry) complete before
    // it leaves.
    if constexpr (Gather)
      asm volatile("cp.async.wait_all;\n" ::: "memory");
    if (Cluster > 1 && threadIdx.x == 0)
      waitOutTheCluster<Stages>(emptyBars, step);
    return;
  }

  Registers::consumer();
  const int consumer = warpGroup - 1;
  const int t128 = threadIdx.x % 128, warp = t128 / 32, lane = t128 % 32;
  // Cooperative: both warpgroups on every tile, 64 rows each. Ping-pong:
  // each takes every other tile whole (two m64 blocks), so one stores
  // while the other multiplies.
  constexpr int Blocks = PingPong ? 2 : 1;
  const int firstRow = PingPong ? 0 : consumer * 64;
  T *c = static_cast<T *>(p.c);
  uint32_t step = 0; // k blocks of the sequence so far, over all tiles
  float acc[Blocks][BN / 2];
  int64_t mine = 0; // this CTA's tiles so far
  for (int64_t t = cluster; t < tiles; t += clusters, ++mine) {
    if (PingPong && (mine & 1) != consumer) {
      step += kTiles; // the other warpgroup's tile
      continue;
    }
    if constexpr (PingPong)
      waitForThePreviousTile(orderBars, consumer, mine);
    // Only the store needs the tile's place: its group scan (loads of the
    // groups' counts) runs while the last products finish, not before the
    // first (Run 41's profile: a third of the warps' stalls on such loads);
    // the combine's store keeps it first (later, its registers spill).
    TileWork w;
    if constexpr (Combine)
      w = tileAt<Cluster>(p, t, mTiles, nTiles, TileN, rank);
    zeroAccumulators(acc);
    for (int kt = 0; kt < kTiles; ++kt, ++step) {
      const uint32_t s = step % Stages;
      barrierWait(fullBars + 8 * s, (step / Stages) & 1);
      // A gathered A was written by cp.async (the generic proxy); wgmma
      // reads through the async proxy.
      if constexpr (Gather)
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      const uint32_t a = stages + s * L::StageBytes + firstRow * 128;
      const uint32_t b = stages + s * L::StageBytes + L::ABytes;
      // No branch between the wgmmas: a per-tile choice there (a half-width
      // product for a last tile of 128 columns, 3f2354c) made ptxas
      // serialize them (C7520) in every 256-column form, 10% slower.
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        // A: K-major, 128-byte rows; step kk's 16 elements are 32 bytes
        // into each row (the swizzle applies to the absolute address).
        uint64_t db = BKMajor
                          ? descriptor(b + kk * 32, 16, 1024)
                          : descriptor(b + kk * 16 * 128, kTileK * 128, 1024);
#pragma unroll
        for (int h = 0; h < Blocks; ++h)
          Wgmma<T, BN>::template run<0, BKMajor ? 0 : 1>(
              acc[h], descriptor(a + h * 64 * 128 + kk * 32, 16, 1024), db);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      // The previous stage's products are done: its buffers go back.
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
      if (kt > 0)
        releaseStage<Cluster>(emptyBars, (step - 1) % Stages, lane);
    }
    if constexpr (!Combine)
      w = tileAt<Cluster>(p, t, mTiles, nTiles, TileN, rank);
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    if (kTiles > 0)
      releaseStage<Cluster>(emptyBars, (step - 1) % Stages, lane);
    if (PingPong && t128 == 0)
      barrierArrive(orderBars + 8 * consumer); // this tile's stages are in

    // The accumulators of m64nBNk16: thread t of the warpgroup holds rows
    // 16 * warp + lane / 4 (+ 8), columns 8 * j + 2 * (lane % 4) (+ 1).
    if constexpr (Staged) {
      storeTileStaged<T, BN, Blocks, Store, Act>(
          p, w, acc,
          staging +
              (consumer * 4 + warp) * (kStagingRows * kStagingColumns * 4),
          firstRow + warp * 16, lane);
    } else
#pragma unroll
      for (int h = 0; h < Blocks; ++h)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t local =
              firstRow + h * 64 + warp * 16 + lane / 4 + half * 8;
          if (local >= w.rowsValid)
            continue;
          const int64_t at = (w.row0 + local) * p.n;
          if constexpr (Glu) {
            // Column j of the gate beside column j of up (64 apart in the
            // tile): each product rounded to T as a GEMM stores it, then
            // c = silu(gate) * up as the glu kernel computes it.
#pragma unroll
          for (int j = 0; j < TileN / 8; ++j) {
            const int64_t col = w.n0 + 8 * j + 2 * (lane % 4);
            if (col >= p.n)
              continue;
            float g[2], u[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              g[e] = toStored<T>(acc[h][4 * j + 2 * half + e]);
              u[e] = toStored<T>(acc[h][4 * (j + TileN / 8) + 2 * half + e]);
            }
            if (p.gateOut)
              storePair(static_cast<T *>(p.gateOut) + at + col, g[0], g[1]);
            if (p.upOut)
              storePair(static_cast<T *>(p.upOut) + at + col, u[0], u[1]);
            storePair(c + at + col, detail::siluForward(g[0]) * u[0],
                      detail::siluForward(g[1]) * u[1]);
          }
          continue;
        }
        T *out = c + at;
        const T *bias =
            Store == StoreMode::BiasActivation && p.bias
                ? static_cast<const T *>(p.bias) + int64_t(w.group) * p.n
                : nullptr;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int64_t col = w.n0 + 8 * j + 2 * (lane % 4);
          if (col >= p.n)
            continue;
          float v0 = acc[h][4 * j + 2 * half],
                v1 = acc[h][4 * j + 2 * half + 1];
          if constexpr (Store == StoreMode::Plain) {
            if (p.accumulate) {
              v0 += float(out[col]);
              v1 += float(out[col + 1]);
            }
          } else if constexpr (Store == StoreMode::GluBackward) {
            // As gluBackward: from the stored product d, grad_up_in =
            // d * silu(gate) and grad_gate_in = d * up * silu'(gate).
            float d0 = toStored<T>(v0), d1 = toStored<T>(v1), g0, g1, u0, u1;
            loadPair(static_cast<const T *>(p.gluGate) + at + col, g0, g1);
            loadPair(static_cast<const T *>(p.gluUp) + at + col, u0, u1);
            storePair(static_cast<T *>(p.gluGradUp) + at + col,
                      d0 * detail::siluForward(g0),
                      d1 * detail::siluForward(g1));
            v0 = d0 * u0 * detail::siluDerivative(g0);
            v1 = d1 * u1 * detail::siluDerivative(g1);
          } else {
            finishPair<T, Store, Act>(p, at, col, bias,
                                      pairInput<T, Store>(p, at, col, bias), v0,
                                      v1);
          }
          storePair(out + col, v0, v1);
        }
        }
    if constexpr (Combine && !Glu)
      detail::combineWarpRows<T, Blocks>(
          p.combine, c, p.n, w.row0, firstRow, w.rowsValid, w.n0,
          min(int64_t{BN}, p.n - w.n0), warp, lane);
  }
  // The tokens no tile arrives for (every choice dropped): zeros, as the
  // combine writes them.
  if constexpr (Combine && !Glu)
    detail::zeroDroppedTokens<T>(
        p.combine, p.n, int64_t(blockIdx.x) * 256 + consumer * 128 + t128,
        int64_t(gridDim.x) * 256);
#endif
}

/// cuTensorMapEncodeTiled through the runtime's entry-point query (no link
/// against libcuda); null when the driver has none.
inline PFN_cuTensorMapEncodeTiled_v12000 tensorMapEncoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void *fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                         cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

/// The tensor map of grouped weights B as [groups][k][n] in boxes of 64 x
/// 64, or with bKMajor as [groups][n][k] in boxes of bn x 64; 128-byte
/// swizzle, zeros outside. Where the driver refuses, the CUresult.
inline CUresult makeWeightMap(CUtensorMap &map, bool bf16, const void *b,
                              int64_t k, int64_t n, int64_t groups,
                              bool bKMajor, int bn) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensorMapEncoder();
  if (!encode)
    return CUDA_ERROR_NOT_SUPPORTED;
  const cuuint32_t unit[3] = {1, 1, 1};
  const cuuint64_t inner = bKMajor ? k : n, outer = bKMajor ? n : k;
  const cuuint64_t dims[3] = {inner, outer, cuuint64_t(groups)};
  const cuuint64_t strides[2] = {inner * 2, inner * outer * 2};
  const cuuint32_t box[3] = {64, bKMajor ? cuuint32_t(bn) : 64u, 1};
  return encode(
      &map,
      bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      3, const_cast<void *>(b), dims, strides, box, unit,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

/// The tensor maps of a ragged-M GEMM: A as [rowBound][k] in boxes of 128
/// rows x 64 columns, B as makeWeightMap says.
inline CUresult makeRaggedMMaps(CUtensorMap &mapA, CUtensorMap &mapB, bool bf16,
                                const void *a, const void *b, int64_t rowBound,
                                int64_t k, int64_t n, int64_t groups,
                                bool bKMajor, int bn) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensorMapEncoder();
  if (!encode)
    return CUDA_ERROR_NOT_SUPPORTED;
  const cuuint32_t unit[2] = {1, 1};
  const cuuint64_t aDims[2] = {cuuint64_t(k), cuuint64_t(rowBound)};
  const cuuint64_t aStrides[1] = {cuuint64_t(k) * 2};
  const cuuint32_t aBox[2] = {kTileK, kTileM};
  CUresult r = encode(
      &mapA,
      bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      2, const_cast<void *>(a), aDims, aStrides, aBox, unit,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return r;
  return makeWeightMap(mapB, bf16, b, k, n, groups, bKMajor, bn);
}

/// Whether `kernel`'s image starts with the registers its setmaxnreg split
/// counts on (kStartRegisters; with fewer the consumers would wait
/// forever): cudaErrorInvalidKernelImage if not. A property of the image,
/// asked once per kernel.
template <typename Kernel> cudaError_t startRegistersOf(Kernel kernel) {
  cudaFuncAttributes attributes{};
  if (cudaError_t e = cudaFuncGetAttributes(&attributes, kernel))
    return e;
  return attributes.numRegs >= kStartRegisters ? cudaSuccess
                                               : cudaErrorInvalidKernelImage;
}

/// A launch configuration of `kernel`'s CTAs in clusters of Cluster along
/// x (no cluster attribute for 1); `attribute` backs config.attrs.
inline cudaLaunchConfig_t clusterConfig(int cluster, int bytes,
                                        cudaLaunchAttribute &attribute) {
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = bytes;
  attribute = {};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = cluster > 1 ? 1 : 0;
  return config;
}

/// How many clusters of Cluster CTAs of `kernel` (`bytes` of dynamic shared
/// memory, already allowed) the current device runs at once: asked once
/// per device (cudaOccupancyMaxActiveClusters), a failed query again next
/// time. (The kernel is a template argument: its count is its own.)
template <int Cluster, auto kernel>
cudaError_t clustersThatFit(int bytes, int ctas, int &fit) {
  static std::atomic<int> fitOf[16] = {};
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device))
    return e;
  fit = device < 16 ? fitOf[device].load() : 0;
  if (fit > 0)
    return cudaSuccess;
  cudaLaunchAttribute attribute;
  cudaLaunchConfig_t config = clusterConfig(Cluster, bytes, attribute);
  config.gridDim = dim3(static_cast<unsigned>(ctas / Cluster * Cluster));
  if (cudaError_t e = cudaOccupancyMaxActiveClusters(&fit, kernel, &config))
    return e;
  if (fit <= 0)
    return cudaErrorLaunchOutOfResources;
  if (device < 16)
    fitOf[device].store(fit);
  return cudaSuccess;
}

/// A persistent launch of `kernel` in clusters of Cluster CTAs: one CTA per
/// SM of `ctas`, as many clusters as fit at once (a GPC's SMs pair up), at
/// most `bound` (the tiles' upper bound, in cluster tiles). First the
/// image's start registers (startRegistersOf, asked once per kernel) and
/// its `bytes` of dynamic shared memory allowed.
template <int Cluster, auto kernel, typename... Args>
cudaError_t launchPersistent(int bytes, int64_t bound, int ctas,
                             cudaStream_t stream, bool dependent,
                             const Args &...args) {
  static const cudaError_t registers = startRegistersOf(kernel);
  if (registers != cudaSuccess)
    return registers;
  if (cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))
    return e;
  if (bound <= 0)
    return cudaSuccess;
  int64_t clusters = ctas / Cluster;
  if (clusters <= 0) // (fewer SMs than a cluster: nothing would run)
    return cudaErrorInvalidConfiguration;
  clusters = bound < clusters ? bound : clusters;
  if constexpr (Cluster > 1) {
    // More than fit at once would only queue.
    int fit = 0;
    if (cudaError_t e = clustersThatFit<Cluster, kernel>(bytes, ctas, fit))
      return e;
    clusters = fit < clusters ? fit : clusters;
  }
  cudaLaunchAttribute attributes[2];
  cudaLaunchConfig_t config = clusterConfig(Cluster, bytes, attributes[0]);
  config.stream = stream;
  config.gridDim = dim3(static_cast<unsigned>(clusters * Cluster));
  if (dependent) { // (the kernel waits: raggedMKernel's contract)
    attributes[config.numAttrs] = {};
    attributes[config.numAttrs].id =
        cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[config.numAttrs].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attributes;
    ++config.numAttrs;
  }
  return cudaLaunchKernelEx(&config, kernel, args...);
}

/// One persistent launch: `ctas` CTAs (at most one per SM), or fewer when
/// the tiles' upper bound (rowBound / TileRows + groups M tiles) is smaller. A
/// cluster of 2 runs as many clusters as fit at once (a GPC's SMs pair up).
template <typename T, int BN, int Stages, bool BKMajor, bool PingPong,
          bool Glu = false, bool Gather = false, int Cluster = 1,
          StoreMode Store = StoreMode::Plain, int Act = 0, bool Combine = false,
          bool DirectStore = false>
cudaError_t launchRaggedM(const CUtensorMap &mapA, const CUtensorMap &mapB,
                          const CUtensorMap &mapUp, const RaggedMParams &p,
                          int ctas, cudaStream_t stream, bool dependent) {
  constexpr auto kernel =
      raggedMKernel<T, BN, Stages, BKMajor, PingPong, Glu, Gather, Cluster,
                    Store, Act, Combine, DirectStore>;
  constexpr int bytes =
      Layout<BN, Stages,
             stagedStore(Glu, Store, Combine, DirectStore)>::SharedBytes;
  constexpr int TileN = Glu ? BN / 2 : BN;
  constexpr int64_t TileRows = kTileM * Cluster;
  const int64_t bound = ((p.rowBound + TileRows - 1) / TileRows + p.groups) *
                        ((p.n + TileN - 1) / TileN);
  return launchPersistent<Cluster, kernel>(bytes, bound, ctas, stream,
                                           dependent, mapA, mapB, mapUp, p);
}

} // namespace flex::cuda::hopper

#endif // LIB_RUNTIME_CUDA_HOPPERGEMMKERNEL_CUH
