//===- DeviceGroupedGemm.cu - grouped GEMMs sized on the device ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the grouped GEMMs of a dynamic routing with the
// groups' sizes read on the device: one launch for all experts, no host read
// of the counts, so a dropless pass can be recorded as a CUDA graph.
//
// One kernel template, tensor cores through mma.sync m16n8k16 (bf16/f16 in,
// fp32 accumulate; sm_80 and sm_90), operands staged in shared memory by a
// multi-stage cp.async pipeline and read with ldmatrix (.trans for the
// operands whose contiguous dimension is not K). Two shapes of work:
//  - ragged M (forward and input gradient): C[rows of e, n] = A[rows of e, k]
//    B[e]; the grid's y walks the M tiles of all groups in order, and each
//    warp finds its tile's group by a warp-wide scan of the row counts;
//  - ragged K (weight gradient): gradB[e][k, n] = A[rows of e]^T gradC[rows
//    of e]; the grid's z is the group and the K loop runs over its rows.
// Why not CUTLASS or cuBLAS: cuBLAS's grouped GEMM takes its sizes from host
// arrays, and a CUTLASS sm_90 grouped kernel needs a header dependency and
// minutes of nvcc per instantiation on CI's two cores; this kernel is short,
// and the cuBLAS paths stay for the shapes where they are faster
// (GroupedGemm.cu chooses; docs/Runtime.md has the measurements).
//
//===----------------------------------------------------------------------===//

#include "CombineInStore.cuh"
#include "CudaSupport.cuh"
#include "DependentLaunch.cuh"
#include "GroupedGemmInternal.h"
#include "MmaSyncPrimitives.cuh"
#include "flex/Runtime/Core/GroupedGemmRule.h"

#include <atomic>
#include <type_traits>

namespace flex::cuda::detail {

namespace {

/// A CTA computes a BM x BN tile of C with WarpsM x WarpsN warps, BK of the
/// reduction per pipeline stage.
template <int BM_, int BN_, int BK_, int WarpsM_, int WarpsN_, int Stages_>
struct Tiles {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WarpsM = WarpsM_, WarpsN = WarpsN_, Stages = Stages_;
  static constexpr int Threads = WarpsM * WarpsN * 32;
  static constexpr int WarpM = BM / WarpsM, WarpN = BN / WarpsN;
  static constexpr int MI = WarpM / 16, NI = WarpN / 8;
  /// Whether the store applies a fused epilogue: the few-rows tile only,
  /// where the epilogue's own launch and pass are a visible share of the
  /// GEMM (decode); in the larger tiles its registers, live through the
  /// main loop, cost occupancy (128 -> 165 per thread, one CTA per SM).
  static constexpr bool FusesEpilogue = BM <= 32;
  static_assert(WarpM % 16 == 0 && WarpN % 16 == 0 && BK % 16 == 0);
};
/// Many rows per group (prefill, training).
using LargeTiles = Tiles<128, 128, 32, 2, 4, 4>;
/// Few rows per group (decode): the weights stream once, little M waste.
using SmallTiles = Tiles<32, 128, 64, 1, 4, 4>;
/// Many rows, wider N: 64 x 64 per warp (more MMAs per shared-memory read).
using WideTiles = Tiles<128, 256, 32, 2, 4, 3>;
// The cost model pads each expert's rows to these tiles.
static_assert(SmallTiles::BM == deviceGemmTileRows(DeviceGemmTile::Small) &&
              LargeTiles::BM == deviceGemmTileRows(DeviceGemmTile::Large));

/// The operands of one CTA's tile: where A, B and C start, how far they are
/// valid, and the reduction length.
template <typename T> struct TileProblem {
  const T *a; ///< A at (tile's first M row or K row, 0)
  const T *b; ///< B at the tile's first N column
  T *c;       ///< C at the tile's (first row, first column)
  int64_t lda, ldb, ldc;
  int64_t mValid; ///< rows of the tile inside the problem
  int64_t nValid; ///< columns of the tile inside the problem
  int64_t kTotal; ///< reduction length
  /// A's and B's steps along K per K tile are aStepK * BK and bStepK * BK
  /// elements (the row stride when K is the outer dimension, else 1).
  int64_t aStepK, bStepK;
  /// A gathered A (row_tokens): `a` is the gathered buffer's row 0 (at the
  /// tile's column for a weight gradient) and A's row i (its K row i for a
  /// weight gradient) is row aIndex[i] of it, in [0, aIndexBound).
  const int32_t *aIndex = nullptr;
  int64_t aIndexBound = 0;
  /// The fused epilogue (forward, not accumulating): the product rounded to
  /// T as the unfused path stores it, plus biasScale * bias (bias at the
  /// tile's first column of its expert's row, or null), that value into
  /// `pre` (same strides as c, or null), then `epilogue` (an Epilogue) into
  /// c: bit for bit what applyGemmEpilogue does after the unfused store.
  const T *bias = nullptr;
  T *pre = nullptr;
  int epilogue = 0;
  float biasScale = 1.0f;
  bool fusedEpilogue = false;
  /// The GLU tile (raggedMKernel's Glu): B's columns [0, BN/2) are b's
  /// (the gate's) and [BN/2, BN) b_up's, both from the tile's first output
  /// column; nValid counts output columns. The store writes c = silu(gate)
  /// * up, each product rounded to T first, and the rounded products into
  /// gateOut / upOut when given (same strides as c).
  const T *bUp = nullptr;
  T *gateOut = nullptr, *upOut = nullptr;
};

/// v (the fp32 sums of one row's columns col...) through the fused epilogue:
/// `pre` receives the biased value, v the activated one.
template <typename T, int N>
__device__ __forceinline__ void epilogueValues(const TileProblem<T> &p,
                                               int64_t row, int64_t col,
                                               float (&v)[N]) {
  float b[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    v[j] = toFloat(fromFloat<T>(v[j]));
    b[j] = p.bias ? toFloat(p.bias[col + j]) : 0.0f;
  }
  if (p.bias)
#pragma unroll
    for (int j = 0; j < N; ++j)
      v[j] = __fadd_rn(v[j], __fmul_rn(b[j], p.biasScale));
  if (p.pre) {
    if constexpr (N == 8)
      storeVector(p.pre + row * p.ldc + col, v);
    else
#pragma unroll
      for (int j = 0; j < N; ++j)
        p.pre[row * p.ldc + col + j] = fromFloat<T>(v[j]);
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    v[j] = applyEpilogue(p.epilogue, v[j]);
}

/// The fp32 C tile staged in shared memory: rows padded by 4 floats (16
/// bytes), so each row stays 16-byte aligned.
template <typename Cfg> constexpr int stagedStride() { return Cfg::BN + 4; }
template <typename Cfg> constexpr bool StagedStoreFits(int sharedBytes) {
  return Cfg::BM * stagedStride<Cfg>() * int(sizeof(float)) <= sharedBytes;
}

/// The accumulators straight to global memory, a pair of adjacent columns
/// per store (n is a multiple of 8, so a pair is whole and 4-byte aligned).
/// The accumulator of m16n8: rows lane / 4 and lane / 4 + 8, columns
/// 2 * (lane % 4) + {0, 1}.
template <typename T, typename Cfg>
__device__ __forceinline__ void
storeTileDirect(const TileProblem<T> &p,
                const float (&acc)[Cfg::MI][Cfg::NI][4], bool accumulate) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warpM = (warp / Cfg::WarpsN) * Cfg::WarpM;
  const int warpN = (warp % Cfg::WarpsN) * Cfg::WarpN;
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int row = warpM + mi * 16 + lane / 4 + half * 8;
      if (row >= p.mValid)
        continue;
      T *out = p.c + row * p.ldc;
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni) {
        int col = warpN + ni * 8 + 2 * (lane % 4);
        if (col >= p.nValid)
          continue;
        float v[2] = {acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]};
        if (accumulate) {
          v[0] += toFloat(out[col]);
          v[1] += toFloat(out[col + 1]);
        }
        if constexpr (Cfg::FusesEpilogue)
          if (p.fusedEpilogue)
            epilogueValues<T, 2>(p, row, col, v);
        out[col] = fromFloat<T>(v[0]);
        out[col + 1] = fromFloat<T>(v[1]);
      }
    }
}

/// The GLU tile's store from the staged fp32 products: the gate's column j
/// beside the up projection's column BN/2 + j. Each product is rounded to T
/// as a GEMM's store rounds it, then c = silu(gate) * up as the glu kernel
/// computes it: bit for bit two GEMMs and a glu.
template <typename T, typename Cfg>
__device__ __forceinline__ void storeGluRows(const TileProblem<T> &p,
                                             const float *staged) {
  constexpr int Stride = stagedStride<Cfg>(), Half = Cfg::BN / 2;
  constexpr int ChunksPerRow = Half / 8;
  for (int i = threadIdx.x; i < Cfg::BM * ChunksPerRow; i += Cfg::Threads) {
    int row = i / ChunksPerRow, col = (i % ChunksPerRow) * 8;
    if (row >= p.mValid || col >= p.nValid) // nValid: a multiple of 8
      continue;
    const float *gate = staged + row * Stride + col;
    float g[8], u[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      g[j] = toFloat(fromFloat<T>(gate[j]));
      u[j] = toFloat(fromFloat<T>(gate[Half + j]));
    }
    const int64_t at = row * p.ldc + col;
    if (p.gateOut)
      storeVector(p.gateOut + at, g);
    if (p.upOut)
      storeVector(p.upOut + at, u);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      g[j] = siluForward(g[j]) * u[j];
    storeVector(p.c + at, g);
  }
}

/// The accumulators through shared memory, then 16-byte rows of 8 elements
/// to global memory: a warp's stores cover whole rows instead of 4-byte
/// pieces of 8 rows. A tile with few reduction steps (a weight gradient
/// over an expert's few rows, decode) is bound by this store. Sums stay in
/// fp32 until the one rounding, as in storeTileDirect.
template <typename T, typename Cfg, bool Glu>
__device__ __forceinline__ void
storeTileStaged(const TileProblem<T> &p,
                const float (&acc)[Cfg::MI][Cfg::NI][4], bool accumulate,
                T *smem) {
  constexpr int Stride = stagedStride<Cfg>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warpM = (warp / Cfg::WarpsN) * Cfg::WarpM;
  const int warpN = (warp % Cfg::WarpsN) * Cfg::WarpN;
  float *staged = reinterpret_cast<float *>(smem);
  __syncthreads(); // every warp is done with the operand stages
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int row = warpM + mi * 16 + lane / 4 + half * 8;
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni) {
        int col = warpN + ni * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2 *>(staged + row * Stride + col) =
            make_float2(acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
      }
    }
  __syncthreads();
  if constexpr (Glu) {
    storeGluRows<T, Cfg>(p, staged);
    return;
  }
  constexpr int ChunksPerRow = Cfg::BN / 8;
  for (int i = threadIdx.x; i < Cfg::BM * ChunksPerRow; i += Cfg::Threads) {
    int row = i / ChunksPerRow, col = (i % ChunksPerRow) * 8;
    if (row >= p.mValid || col >= p.nValid) // nValid: a multiple of 8
      continue;
    const float4 *src =
        reinterpret_cast<const float4 *>(staged + row * Stride + col);
    float4 lo = src[0], hi = src[1];
    float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    T *out = p.c + row * p.ldc + col;
    if (accumulate) {
      float old[8];
      loadVector(out, old);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        v[j] += old[j];
    }
    if constexpr (Cfg::FusesEpilogue)
      if (p.fusedEpilogue)
        epilogueValues<T, 8>(p, row, col, v);
    storeVector(out, v);
  }
}

/// The CTA's tile: the cp.async pipeline, ldmatrix, mma, and the store.
/// AKContiguous: A is [M][K] in memory (else [K][M]); BKContiguous: B is
/// [N][K] (else [K][N]).
template <typename T, typename Cfg, bool AKContiguous, bool BKContiguous,
          bool Glu = false>
__device__ __forceinline__ void computeTile(const TileProblem<T> &p,
                                            bool accumulate, T *smem) {
  static_assert(!Glu || (AKContiguous && !BKContiguous),
                "the GLU tile is a forward tile with B as [K][N]");
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  using ATile = std::conditional_t<AKContiguous, OperandTile<BM, BK>,
                                   OperandTile<BK, BM>>;
  using BTile = std::conditional_t<BKContiguous, OperandTile<BN, BK>,
                                   OperandTile<BK, BN>>;
  constexpr int StageElements = ATile::Elements + BTile::Elements;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warpM = (warp / Cfg::WarpsN) * Cfg::WarpM;
  const int warpN = (warp % Cfg::WarpsN) * Cfg::WarpN;
  const int64_t kTiles = (p.kTotal + BK - 1) / BK;

  auto loadStage = [&](int64_t kt, int stage) {
    T *sa = smem + stage * StageElements;
    T *sb = sa + ATile::Elements;
    int64_t k0 = kt * BK, kLeft = p.kTotal - k0;
    // A gathered A moves along K by columns (forward) or by its index
    // (weight gradient: K is the rows).
    if constexpr (AKContiguous)
      loadTile<T, BM, BK, Cfg::Threads>(sa, p.a + k0 * p.aStepK, p.lda,
                                        p.mValid, kLeft, p.a, p.aIndex,
                                        p.aIndexBound);
    else if (p.aIndex)
      loadTile<T, BK, BM, Cfg::Threads>(sa, p.a, p.lda, kLeft, p.mValid, p.a,
                                        p.aIndex + k0, p.aIndexBound);
    else
      loadTile<T, BK, BM, Cfg::Threads>(sa, p.a + k0 * p.aStepK, p.lda, kLeft,
                                        p.mValid, p.a);
    if constexpr (Glu) { // the gate's columns, then the up projection's
      loadTile<T, BK, BN / 2, Cfg::Threads, BTile::Stride>(
          sb, p.b + k0 * p.bStepK, p.ldb, kLeft, p.nValid, p.b);
      loadTile<T, BK, BN / 2, Cfg::Threads, BTile::Stride>(
          sb + BN / 2, p.bUp + k0 * p.bStepK, p.ldb, kLeft, p.nValid, p.bUp);
    } else if constexpr (BKContiguous)
      loadTile<T, BN, BK, Cfg::Threads>(sb, p.b + k0 * p.bStepK, p.ldb,
                                        p.nValid, kLeft, p.b);
    else
      loadTile<T, BK, BN, Cfg::Threads>(sb, p.b + k0 * p.bStepK, p.ldb, kLeft,
                                        p.nValid, p.b);
  };

  float acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        acc[mi][ni][r] = 0.0f;

#pragma unroll
  for (int s = 0; s < Cfg::Stages - 1; ++s) {
    if (s < kTiles)
      loadStage(s, s);
    commitAsync();
  }

  const int group8 = lane / 8, row8 = lane % 8;
  for (int64_t kt = 0; kt < kTiles; ++kt) {
    waitAsync<Cfg::Stages - 2>();
    __syncthreads();
    // The stage refilled here was read in the previous iteration, which
    // every thread has finished (the barrier above).
    int64_t next = kt + Cfg::Stages - 1;
    if (next < kTiles)
      loadStage(next, static_cast<int>(next % Cfg::Stages));
    commitAsync();

    const T *sa = smem + (kt % Cfg::Stages) * StageElements;
    const T *sb = sa + ATile::Elements;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[Cfg::MI][4], bf[Cfg::NI][2];
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi) {
        int m0 = warpM + mi * 16;
        if constexpr (AKContiguous)
          loadMatrixX4(af[mi], sa + (m0 + lane % 16) * ATile::Stride + kk +
                                   (lane / 16) * 8);
        else
          loadMatrixX4Trans(
              af[mi], sa + (kk + row8 + (group8 / 2) * 8) * ATile::Stride + m0 +
                          (group8 % 2) * 8);
      }
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ni += 2) {
        int n0 = warpN + ni * 8;
        uint32_t r[4];
        if constexpr (BKContiguous)
          loadMatrixX4(r, sb + (n0 + (group8 / 2) * 8 + row8) * BTile::Stride +
                              kk + (group8 % 2) * 8);
        else
          loadMatrixX4Trans(
              r, sb + (kk + (group8 % 2) * 8 + row8) * BTile::Stride + n0 +
                     (group8 / 2) * 8);
        bf[ni][0] = r[0];
        bf[ni][1] = r[1];
        bf[ni + 1][0] = r[2];
        bf[ni + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Cfg::NI; ++ni)
          mma16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
  waitAsync<0>();
  if (accumulate && kTiles == 0)
    return;
  constexpr int SharedBytes = Cfg::Stages * StageElements * int(sizeof(T));
  static_assert(!Glu || StagedStoreFits<Cfg>(SharedBytes),
                "the GLU store pairs columns through shared memory");
  if constexpr (StagedStoreFits<Cfg>(SharedBytes))
    storeTileStaged<T, Cfg, Glu>(p, acc, accumulate, smem);
  else
    storeTileDirect<T, Cfg>(p, acc, accumulate);
}

template <typename Cfg> constexpr int sharedBytes(bool aK, bool bK) {
  int a = aK ? OperandTile<Cfg::BM, Cfg::BK>::Elements
             : OperandTile<Cfg::BK, Cfg::BM>::Elements;
  int b = bK ? OperandTile<Cfg::BN, Cfg::BK>::Elements
             : OperandTile<Cfg::BK, Cfg::BN>::Elements;
  return (a + b) * Cfg::Stages * 2;
}

/// Group g's rows as the kernels use them: the device count clamped to the
/// buffer's declared rows, so inconsistent counts never reach past it.
__device__ __forceinline__ int64_t groupRows(const int32_t *offsets,
                                             const int32_t *rows, int64_t g,
                                             int64_t rowBound) {
  int64_t first = offsets[g];
  int64_t count = rows[g];
  if (first < 0 || count <= 0)
    return 0;
  return min(count, max(rowBound - first, int64_t{0}));
}

/// Group g's first row and rows: a static row space's g * C and C (the
/// GLU step on a fixed capacity; no device counts), else the device's.
__device__ __forceinline__ int64_t groupFirst(const int32_t *offsets,
                                              int64_t staticCapacity,
                                              int64_t g) {
  return staticCapacity >= 0 ? g * staticCapacity : offsets[g];
}
__device__ __forceinline__ int64_t groupRows(const int32_t *offsets,
                                             const int32_t *rows,
                                             int64_t staticCapacity, int64_t g,
                                             int64_t rowBound) {
  if (staticCapacity < 0)
    return groupRows(offsets, rows, g, rowBound);
  int64_t first = g * staticCapacity;
  int64_t count = staticCapacity;
  if (first < 0 || count <= 0)
    return 0;
  return min(count, max(rowBound - first, int64_t{0}));
}

struct RaggedMArgs {
  const void *a, *b;
  void *c;
  const int32_t *offsets, *rows;
  int32_t groups;
  int64_t k, n;
  int64_t rowBound;
  bool accumulate;
  RowGather gather;
  DeviceGemmEpilogue epilogue;
  /// C of a static row space (offsets and rows unused), else -1.
  int64_t staticCapacity = -1;
  /// The GLU kernel: b_up, and the products' copies (or null).
  const void *bUp = nullptr;
  void *gateOut = nullptr, *upOut = nullptr;
};

/// Ragged M: blockIdx.y is the y-th M tile over the groups in order,
/// blockIdx.x the N tile (of BN / 2 output columns with Glu).
template <typename T, typename Cfg, bool BKContiguous, bool Glu = false>
__global__ void __launch_bounds__(Cfg::Threads)
    raggedMKernel(RaggedMArgs args) {
#ifdef FLEX_GEMM_UNSUPPORTED_ARCH
  __trap();
#else
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  extern __shared__ __align__(16) unsigned char sharedRaw[];
  const int lane = threadIdx.x % 32;
  const int64_t tile = blockIdx.y;
  // grouped_gemm_combine: the first column tile's blocks zero the tokens
  // no tile arrives for (every choice dropped), as the combine does.
  constexpr bool Combines = Cfg::FusesEpilogue && !Glu;
  if constexpr (Combines)
    if (args.epilogue.combine.out && blockIdx.x == 0)
      zeroDroppedTokens<T>(args.epilogue.combine, args.n,
                           tile * Cfg::Threads + threadIdx.x,
                           int64_t(gridDim.y) * Cfg::Threads);
  // Every warp scans the groups' tile counts itself (no barrier needed):
  // the group whose tiles hold `tile`. (GroupTiles.cuh's findGroupTile is
  // the same scan; called here it took the large tile from 125 to 156
  // registers, one CTA per SM instead of two, so this kernel keeps its own.)
  int32_t group = -1;
  int64_t firstTile = 0, seen = 0;
  for (int32_t base = 0; base < args.groups; base += 32) {
    int32_t g = base + lane;
    int64_t rows = g < args.groups
                       ? groupRows(args.offsets, args.rows, args.staticCapacity,
                                   g, args.rowBound)
                       : 0;
    int64_t count = (rows + Cfg::BM - 1) / Cfg::BM, inclusive = count;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      int64_t other = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d)
        inclusive += other;
    }
    int64_t total = __shfl_sync(0xffffffffu, inclusive, 31);
    if (tile < seen + total) {
      unsigned hit = __ballot_sync(0xffffffffu, seen + inclusive > tile);
      int first = __ffs(hit) - 1;
      group = base + first;
      firstTile = seen + __shfl_sync(0xffffffffu, inclusive - count, first);
      break;
    }
    seen += total;
  }
  if (group < 0)
    return;
  const T *a = static_cast<const T *>(args.a);
  const T *b = static_cast<const T *>(args.b);
  T *c = static_cast<T *>(args.c);
  int64_t rowInGroup = (tile - firstTile) * Cfg::BM;
  int64_t row =
      groupFirst(args.offsets, args.staticCapacity, group) + rowInGroup;
  int64_t n0 = static_cast<int64_t>(blockIdx.x) * (Glu ? Cfg::BN / 2 : Cfg::BN);
  const T *bGroup = b + static_cast<int64_t>(group) * args.k * args.n;
  TileProblem<T> p;
  p.a = args.gather.rowTokens ? a : a + row * args.k;
  p.lda = args.k;
  p.aStepK = 1;
  if (args.gather.rowTokens) {
    p.aIndex = args.gather.rowTokens + row;
    p.aIndexBound = args.gather.tokens;
  }
  if constexpr (BKContiguous) { // b[e] is [n][k], used transposed
    p.b = bGroup + n0 * args.k;
    p.ldb = args.k;
    p.bStepK = 1;
  } else { // b[e] is [k][n]
    p.b = bGroup + n0;
    p.ldb = args.n;
    p.bStepK = args.n;
  }
  p.c = c + row * args.n + n0;
  p.ldc = args.n;
  p.mValid = groupRows(args.offsets, args.rows, args.staticCapacity, group,
                       args.rowBound) -
             rowInGroup;
  p.nValid = args.n - n0;
  p.kTotal = args.k;
  if (Cfg::FusesEpilogue && args.epilogue.fused) {
    p.fusedEpilogue = true;
    p.epilogue = static_cast<int>(args.epilogue.epilogue);
    p.biasScale = args.epilogue.biasScale;
    if (args.epilogue.bias)
      p.bias = static_cast<const T *>(args.epilogue.bias) + group * args.n + n0;
    if (args.epilogue.pre)
      p.pre = static_cast<T *>(args.epilogue.pre) + row * args.n + n0;
  }
  if constexpr (Glu) {
    p.bUp = static_cast<const T *>(args.bUp) +
            static_cast<int64_t>(group) * args.k * args.n + n0;
    if (args.gateOut)
      p.gateOut = static_cast<T *>(args.gateOut) + row * args.n + n0;
    if (args.upOut)
      p.upOut = static_cast<T *>(args.upOut) + row * args.n + n0;
  }
  computeTile<T, Cfg, true, BKContiguous, Glu>(
      p, args.accumulate, reinterpret_cast<T *>(sharedRaw));
  if constexpr (Combines)
    if (args.epilogue.combine.out)
      combineTile<T, Cfg::BM>(args.epilogue.combine, c, args.n, row, p.mValid,
                              n0, min(int64_t{Cfg::BN}, p.nValid));
#endif
}

struct RaggedKArgs {
  const void *a, *gradC;
  void *gradB;
  const int32_t *offsets, *rows;
  int64_t k, n;
  int64_t rowBound;
  bool accumulate;
  RowGather gather;
};

/// Ragged K: gradB[z][k, n] over blockIdx.y (K rows) and x (N columns).
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::Threads)
    raggedKKernel(RaggedKArgs args) {
#ifdef FLEX_GEMM_UNSUPPORTED_ARCH
  __trap();
#else
  extern __shared__ __align__(16) unsigned char sharedRaw[];
  const int64_t group = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * Cfg::BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::BN;
  const int64_t rows =
      groupRows(args.offsets, args.rows, group, args.rowBound);
  const int64_t first = rows > 0 ? args.offsets[group] : 0;
  TileProblem<T> p;
  // A^T: a is [rows][k], so the tile is [K = rows][M = k columns].
  p.a = static_cast<const T *>(args.a) +
        (args.gather.rowTokens ? 0 : first * args.k) + m0;
  p.lda = args.k;
  p.aStepK = args.k;
  if (args.gather.rowTokens) {
    p.aIndex = args.gather.rowTokens + first;
    p.aIndexBound = args.gather.tokens;
  }
  p.b = static_cast<const T *>(args.gradC) + first * args.n + n0;
  p.ldb = args.n;
  p.bStepK = args.n;
  p.c =
      static_cast<T *>(args.gradB) + group * args.k * args.n + m0 * args.n + n0;
  p.ldc = args.n;
  p.mValid = args.k - m0;
  p.nValid = args.n - n0;
  p.kTotal = rows;
  computeTile<T, Cfg, false, false>(p, args.accumulate,
                                    reinterpret_cast<T *>(sharedRaw));
#endif
}

/// Lets `Kernel` use `bytes` of dynamic shared memory (above 48 KiB needs
/// the opt-in), once per kernel and device (the first call is eager, before
/// any graph records).
template <auto Kernel> Status allowShared(int bytes) {
  static std::atomic<uint64_t> doneDevices{0};
  int device = 0;
  if (Status s = checkCuda(cudaGetDevice(&device), "cudaGetDevice"); !s)
    return s;
  uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit && (doneDevices.load() & bit))
    return Status::ok();
  if (Status s = checkCuda(
          cudaFuncSetAttribute(
              Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
          "cudaFuncSetAttribute (grouped GEMM shared memory)");
      !s)
    return s;
  doneDevices.fetch_or(bit);
  return Status::ok();
}

template <typename T, typename Cfg, bool BKContiguous, bool Glu = false>
Status launchRaggedM(KernelContext &ctx, const RaggedMArgs &args,
                     int64_t rowBound) {
  constexpr int bytes = sharedBytes<Cfg>(true, BKContiguous);
  constexpr auto kernel = raggedMKernel<T, Cfg, BKContiguous, Glu>;
  if (Status s = allowShared<kernel>(bytes); !s)
    return s;
  // Each group's last tile may be partial: at most rowBound / BM + groups
  // tiles; the CTAs past the real count return at once.
  int64_t mTiles = (rowBound + Cfg::BM - 1) / Cfg::BM + args.groups;
  constexpr int64_t tileColumns = Glu ? Cfg::BN / 2 : Cfg::BN;
  int64_t nTiles = (args.n + tileColumns - 1) / tileColumns;
  dim3 grid(static_cast<unsigned>(nTiles), static_cast<unsigned>(mTiles));
  detail::launchDependent(ctx, kernel, grid, Cfg::Threads, bytes, args);
  return checkLaunch("grouped GEMM kernel (device-sized)");
}

template <typename T>
Status launchRaggedK(KernelContext &ctx, const RaggedKArgs &args,
                     int64_t groups) {
  using Cfg = LargeTiles;
  constexpr int bytes = sharedBytes<Cfg>(false, false);
  constexpr auto kernel = raggedKKernel<T, Cfg>;
  if (Status s = allowShared<kernel>(bytes); !s)
    return s;
  dim3 grid(static_cast<unsigned>((args.n + Cfg::BN - 1) / Cfg::BN),
            static_cast<unsigned>((args.k + Cfg::BM - 1) / Cfg::BM),
            static_cast<unsigned>(groups));
  kernel<<<grid, Cfg::Threads, bytes, ctx.stream()>>>(args);
  return checkLaunch("grouped GEMM weight-gradient kernel (device-sized)");
}

/// The grid's limits (y and z at most 65535 blocks).
constexpr int64_t kMaxGridYZ = 65535;

} // namespace

bool deviceGroupedGemmGridFits(int64_t rowBound, int64_t experts, int64_t k) {
  return (rowBound + SmallTiles::BM - 1) / SmallTiles::BM + experts <=
             kMaxGridYZ &&
         experts <= kMaxGridYZ && k / LargeTiles::BM < kMaxGridYZ;
}

namespace {
/// Whether the wgmma kernel takes this call's form: a gathered A only for
/// [K][N] weights (and over some tokens: none reads only zeros, which the
/// other kernel does).
bool wgmmaTakesForm(bool transB, const RowGather &gather) {
  return !(gather.rowTokens && (transB || gather.tokens <= 0));
}
} // namespace

DeviceTiles
deviceGroupedGemmAutoTiles(const KernelContext &ctx, DType type, int64_t k,
                           int64_t n, const ExpertRowSpace &space, bool transB,
                           const RowGather &gather,
                           std::initializer_list<const void *> pointers) {
  // The wgmma kernel where this device has it, at any rows: its 128 x 256
  // tile beat the mma.sync kernel's few-rows tile at decode too (H100,
  // bench/RESULTS.md Runs 35-36, 64 experts: 3 rows each 136 against 149
  // us, 24 rows 145-150 against 153-156, 16 rows of the large layer 288
  // against 298), but for a gathered A (its cp.async producer, not
  // measured at decode). Else few rows per group take the small M tiles
  // (Core/GroupedGemmRule.h has the measured crossover), more the large.
  const bool small =
      deviceGemmTile(space.rowBound, space.experts) == DeviceGemmTile::Small;
  if (!(small && gather.rowTokens) && wgmmaTakesForm(transB, gather) &&
      hopperGroupedGemmApplies(ctx, type, k, n, space, pointers))
    return DeviceTiles::Hopper;
  return small ? DeviceTiles::Small : DeviceTiles::Large;
}

bool deviceGroupedGemmFusesEpilogue(
    const KernelContext &ctx, DType type, int64_t k, int64_t n,
    const ExpertRowSpace &space, bool transB, const RowGather &gather,
    std::initializer_list<const void *> pointers) {
  return deviceGroupedGemmAutoTiles(ctx, type, k, n, space, transB, gather,
                                    pointers) != DeviceTiles::Large;
}

bool deviceGroupedGemmRuns(const KernelContext &ctx, std::string *reason) {
  if (ctx.computeCapability() < 80) {
    if (reason)
      *reason = "the device-sized grouped GEMM needs compute capability 8.0 "
                "or newer";
    return false;
  }
  // A build for an older architecture only (CI's default) holds traps.
  static const bool builtForSm80 = [] {
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes,
                              raggedKKernel<__nv_bfloat16, LargeTiles>) !=
        cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attributes.ptxVersion >= 80;
  }();
  if (!builtForSm80) {
    if (reason)
      *reason = "this build has no sm_80 code for the device-sized grouped "
                "GEMM (CMAKE_CUDA_ARCHITECTURES)";
    return false;
  }
  return true;
}

bool deviceGroupedGemmApplies(const KernelContext &ctx, DType type, int64_t k,
                              int64_t n, const ExpertRowSpace &space,
                              std::initializer_list<const void *> pointers,
                              std::string *reason, bool staticToo) {
  auto refuse = [&](std::string why) {
    if (reason)
      *reason = std::move(why);
    return false;
  };
  if (type != DType::BF16 && type != DType::F16)
    return refuse("the device-sized grouped GEMM takes bf16 or f16 operands");
  if (space.isStatic() && !staticToo)
    return refuse("the row space is static (one strided-batched GEMM)");
  if (!deviceGroupedGemmRuns(ctx, reason))
    return false;
  if (!vectorizable(k, 2, pointers) || !vectorizable(n, 2, {}))
    return refuse("rows of " + std::to_string(k) + " and " + std::to_string(n) +
                  " elements must be 16-byte aligned for the device-sized "
                  "grouped GEMM");
  if (!deviceGroupedGemmGridFits(space.rowBound, space.experts, k))
    return refuse("the device-sized grouped GEMM's grid would exceed 65535 "
                  "blocks in y or z");
  if (space.rowBound > INT32_MAX || k > INT32_MAX || n > INT32_MAX)
    return refuse("the problem is larger than 2^31 rows or columns");
  return true;
}

Status deviceGroupedGemm(KernelContext &ctx, const void *a, const void *b,
                         void *c, DType type, int64_t k, int64_t n,
                         const ExpertRowSpace &space, bool transB,
                         bool accumulate, DeviceTiles tiles,
                         const RowGather &gather,
                         const DeviceGemmEpilogue &epilogue) {
  if (epilogue.fused && accumulate)
    return Status(StatusCode::Internal,
                  "the device-sized grouped GEMM fuses its epilogue only when "
                  "it does not accumulate");
  if (space.experts == 0 || n == 0 || space.rowBound == 0)
    return Status::ok();
  RaggedMArgs args{a,
                   b,
                   c,
                   space.offsets,
                   space.rows,
                   static_cast<int32_t>(space.experts),
                   k,
                   n,
                   space.rowBound,
                   accumulate,
                   gather,
                   epilogue};
  // Auto's choice has checked that the wgmma kernel takes the call; an
  // explicit wgmma tile is checked here.
  const bool chosen = tiles == DeviceTiles::Auto;
  if (chosen)
    tiles = deviceGroupedGemmAutoTiles(ctx, type, k, n, space, transB, gather,
                                       {a, b, c});
  if (tiles >= DeviceTiles::Hopper) {
    if (!chosen && !wgmmaTakesForm(transB, gather))
      return Status(StatusCode::Internal,
                    "the wgmma grouped GEMM gathers A for [K][N] weights only "
                    "(and over some tokens)");
    std::string why;
    if (!chosen &&
        !hopperGroupedGemmApplies(ctx, type, k, n, space, {a, b, c}, &why))
      return Status(StatusCode::Unavailable, why);
    return hopperGroupedGemm(ctx, a, b, c, type, k, n, space, transB,
                             accumulate,
                             tiles == DeviceTiles::Hopper
                                 ? defaultHopperTile(ctx, kDefaultHopperTile)
                                 : hopperTileOf(tiles),
                             gather, epilogue);
  }
  // (The mma.sync kernel's few-rows tile alone has the fused epilogue, and
  // not the activation's or the GLU's backward.)
  if (epilogue.fused && (epilogue.activationInput || epilogue.gluGate))
    return Status(StatusCode::Internal,
                  "the activation's backward in the grouped GEMM's store runs "
                  "on the wgmma kernel only");
  if (epilogue.fused && tiles != DeviceTiles::Small)
    return Status(StatusCode::Internal,
                  "the mma.sync grouped GEMM fuses its epilogue in its "
                  "few-rows tile only");
  return withType(type, [&](auto tag) -> Status {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return Status(StatusCode::Internal,
                    "the device-sized grouped GEMM was asked for f32");
    } else {
      auto launch = [&](auto cfg) {
        using Cfg = decltype(cfg);
        return transB ? launchRaggedM<T, Cfg, true>(ctx, args, space.rowBound)
                      : launchRaggedM<T, Cfg, false>(ctx, args, space.rowBound);
      };
      switch (tiles) {
      case DeviceTiles::Small:
        return launch(SmallTiles{});
      case DeviceTiles::Wide:
        return launch(WideTiles{});
      default:
        return launch(LargeTiles{});
      }
    }
  });
}

Status deviceGroupedGemmGlu(KernelContext &ctx, const void *a,
                            const void *bGate, const void *bUp, void *c,
                            void *gateOut, void *upOut, DType type, int64_t k,
                            int64_t n, const ExpertRowSpace &space,
                            const RowGather &gather, DeviceTiles tiles) {
  if (space.experts == 0 || n == 0 || space.rowBound == 0)
    return Status::ok();
  RaggedMArgs args{a,
                   bGate,
                   c,
                   space.offsets,
                   space.rows,
                   static_cast<int32_t>(space.experts),
                   k,
                   n,
                   space.rowBound,
                   false,
                   gather,
                   {},
                   space.staticCapacity,
                   bUp,
                   gateOut,
                   upOut};
  bool small =
      deviceGemmTile(space.rowBound, space.experts) == DeviceGemmTile::Small;
  // The wgmma kernel's GLU tile where it applies (an explicit wgmma tile
  // needs it; a gathered A over no tokens reads only zeros): with many rows,
  // and with few unless A is gathered (128 + 128 columns beat the few-rows
  // tile at decode: Runs 35-36, 24 rows per expert 291 against 313 us, 16
  // rows of the large layer 562 against 595).
  const bool wgmmaTile = tiles >= DeviceTiles::Hopper;
  if (wgmmaTile ||
      (tiles == DeviceTiles::Auto && (!small || !gather.rowTokens))) {
    std::string why = "a gathered A over no tokens";
    if (!(gather.rowTokens && gather.tokens <= 0) &&
        hopperGroupedGemmApplies(ctx, type, k, n, space,
                                 {a, bGate, bUp, c, gateOut, upOut}, &why))
      return hopperGroupedGemmGlu(
          ctx, a, bGate, bUp, c, gateOut, upOut, type, k, n, space,
          wgmmaTile && tiles != DeviceTiles::Hopper
              ? hopperTileOf(tiles)
              : defaultHopperTile(ctx, kDefaultHopperGluTile),
          gather);
    if (wgmmaTile)
      return Status(StatusCode::Unavailable, why);
  }
  if (tiles == DeviceTiles::Wide)
    return Status(StatusCode::InvalidArgument,
                  "the GLU step's mma.sync kernel runs small or large tiles");
  if (tiles != DeviceTiles::Auto)
    small = tiles == DeviceTiles::Small;
  return withType(type, [&](auto tag) -> Status {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>)
      return Status(StatusCode::Internal,
                    "the device-sized grouped GEMM was asked for f32");
    else
      return small ? launchRaggedM<T, SmallTiles, false, true>(ctx, args,
                                                               space.rowBound)
                   : launchRaggedM<T, LargeTiles, false, true>(ctx, args,
                                                               space.rowBound);
  });
}

Status deviceGroupedGemmWgrad(KernelContext &ctx, const void *a,
                              const void *gradC, void *gradB, DType type,
                              int64_t k, int64_t n, const ExpertRowSpace &space,
                              bool accumulate, const RowGather &gather,
                              DeviceTiles tiles) {
  if (space.experts == 0 || n == 0 || k == 0)
    return Status::ok();
  // The wgmma kernel where it applies (no gathered A; a dynamic space, as
  // a weight gradient's always is).
  // (No rows at all: the other kernel zeroes the gradients without maps
  // over empty buffers.)
  const bool wgmmaTile = tiles >= DeviceTiles::Hopper;
  std::string why = "the wgmma weight gradient takes no gathered A, static "
                    "row space or empty buffer";
  if (!gather.rowTokens && !space.isStatic() && space.rowBound > 0 &&
      hopperGroupedGemmApplies(ctx, type, k, n, space, {a, gradC, gradB}, &why))
    return hopperGroupedGemmWgrad(
        ctx, a, gradC, gradB, type, k, n, space, accumulate,
        wgmmaTile && tiles != DeviceTiles::Hopper
            ? hopperTileOf(tiles)
            : defaultHopperTile(
                  ctx, measuredWgradTile(ctx, space.rowBound, space.experts)));
  if (wgmmaTile)
    return Status(StatusCode::Unavailable, why);
  RaggedKArgs args{a, gradC, gradB,          space.offsets, space.rows,
                   k, n,     space.rowBound, accumulate,    gather};
  return withType(type, [&](auto tag) -> Status {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>)
      return Status(StatusCode::Internal,
                    "the device-sized grouped GEMM was asked for f32");
    else
      return launchRaggedK<T>(ctx, args, space.experts);
  });
}

} // namespace flex::cuda::detail

namespace flex::cuda {

bool deviceGroupedGemmAvailable(const KernelContext &ctx, std::string *why) {
  return detail::deviceGroupedGemmRuns(ctx, why);
}

bool wgmmaGroupedGemmAvailable(const KernelContext &ctx, std::string *why) {
  return detail::hopperGroupedGemmRuns(ctx, why);
}

} // namespace flex::cuda
