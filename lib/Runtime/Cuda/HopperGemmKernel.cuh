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
//  - raggedKKernel: gradB[g] (+)= A[rows of g]^T gradC[rows of g],
//    ping-pong or cooperative, the latter also in clusters of 2.
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
#include "GroupTiles.cuh"

#include <atomic>
#include <cstdint>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tuple>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLEX_HOPPER_GEMM 1
#endif

namespace flex::cuda::hopper {

/// The CTA's tile: 128 rows (two consumer warpgroups of 64) by BN columns,
/// 64 elements of K (128 bytes: one swizzle row) per stage.
constexpr int kTileM = 128, kTileK = 64;
constexpr int kThreads = 384;

/// The registers the producer warpgroup keeps and each consumer warpgroup
/// grows to (setmaxnreg). A CTA starts with kStartRegisters per thread (384
/// threads, one CTA per SM), and setmaxnreg.inc waits until the CTA's pool
/// holds what it asks for: only what the producer gave back is there, so a
/// split over the start's total never returns (a hang, not an error).
constexpr int kStartRegisters = (65536 / kThreads) & ~7; // 168
template <int Producer, int Consumer> struct RegisterSplit {
  static_assert(Producer % 8 == 0 && Consumer % 8 == 0 && Producer >= 24 &&
                    Consumer <= 256,
                "setmaxnreg takes multiples of 8 in [24, 256]");
  static_assert(128 * Producer + 256 * Consumer <= kStartRegisters * kThreads,
                "the consumers would wait forever for registers the "
                "producer never gave back");
#ifdef FLEX_HOPPER_GEMM
  static __device__ __forceinline__ void producer() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Producer));
  }
  static __device__ __forceinline__ void consumer() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Consumer));
  }
#endif
};

template <int BN, int Stages> struct Layout {
  static constexpr int ABytes = kTileM * kTileK * 2;
  static constexpr int BBytes = BN * kTileK * 2;
  static constexpr int StageBytes = ABytes + BBytes;
  /// Stages, then the full and empty barriers and the ping-pong order's
  /// two; 1024 bytes of slack to align the stages to the swizzle's
  /// 1024-byte period.
  static constexpr int SharedBytes =
      Stages * StageBytes + (2 * Stages + 2) * 8 + 1024;
  static_assert(ABytes % 1024 == 0 && BBytes % 1024 == 0);
};

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
  /// The fused epilogue (not accumulating, not Glu): the product rounded to
  /// T, plus biasScale * bias[g] (bias [groups][n], or null), that value
  /// into `pre` (like c, or null), then activation `epilogue` (Epilogue's
  /// value; 0: none) into c: bit for bit applyGemmEpilogue after the store.
  bool fusedEpilogue = false;
  const void *bias = nullptr;
  void *pre = nullptr;
  int epilogue = 0;
  float biasScale = 1.0f;
  /// Or the activation's backward (not accumulating, not Glu): c = the
  /// product rounded to T times act'(activationInput) (like c; Activation's
  /// value in `derivative`), as activationBackward computes it.
  const void *activationInput = nullptr;
  int derivative = 0;
};

#ifdef FLEX_HOPPER_GEMM
__device__ __forceinline__ uint32_t smemAddress(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void barrierInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar),
               "r"(count));
}
__device__ __forceinline__ void barrierExpectBytes(uint32_t bar,
                                                   uint32_t bytes) {
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}
__device__ __forceinline__ void barrierArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar)
               : "memory");
}
/// ClusterScope: the waiter acquires what other CTAs of the cluster released
/// (their consumers' arrivals on this CTA's empty barriers).
template <bool ClusterScope = false>
__device__ __forceinline__ bool barrierTryWait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  if constexpr (ClusterScope)
    asm volatile("{\n.reg .pred p;\n"
                 "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, "
                 "[%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  else
    asm volatile("{\n.reg .pred p;\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  return done != 0;
}
/// How long a barrier wait may take before the kernel gives up: a stage
/// waits microseconds, a ping-pong tile's turn at most milliseconds (under
/// compute-sanitizer, seconds); a wait this long is a schedule bug, and a
/// trap (a launch failure the runtime reports) beats a hang.
constexpr uint64_t kBarrierWaitLimitNs = 20'000'000'000ull;
__device__ __forceinline__ uint64_t globalNanoseconds() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(ns));
  return ns;
}
template <bool ClusterScope = false>
__device__ __forceinline__ void barrierWait(uint32_t bar, uint32_t parity) {
  if (barrierTryWait<ClusterScope>(bar, parity))
    return;
  const uint64_t start = globalNanoseconds();
  while (!barrierTryWait<ClusterScope>(bar, parity))
    if (globalNanoseconds() - start > kBarrierWaitLimitNs)
      __trap();
}
__device__ __forceinline__ void tmaLoad2d(uint32_t dst, const CUtensorMap *map,
                                          uint32_t bar, int32_t c0,
                                          int32_t c1) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::"
               "complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
               "l"(map), "r"(bar), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void tmaLoad3d(uint32_t dst, const CUtensorMap *map,
                                          uint32_t bar, int32_t c0, int32_t c1,
                                          int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::"
      "complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

/// tmaLoad3d into the same offset of every CTA of ctaMask (the cluster's),
/// each CTA's barrier at `bar` counting the bytes it receives.
__device__ __forceinline__ void
tmaLoad3dMulticast(uint32_t dst, const CUtensorMap *map, uint32_t bar,
                   int32_t c0, int32_t c1, int32_t c2, uint16_t ctaMask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::"
      "complete_tx::bytes.multicast::cluster [%0], [%1, {%3, %4, %5}], [%2], "
      "%6;\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(ctaMask)
      : "memory");
}
/// tmaLoad2d into the same offset of every CTA of ctaMask.
__device__ __forceinline__ void
tmaLoad2dMulticast(uint32_t dst, const CUtensorMap *map, uint32_t bar,
                   int32_t c0, int32_t c1, uint16_t ctaMask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::"
      "complete_tx::bytes.multicast::cluster [%0], [%1, {%3, %4}], [%2], "
      "%5;\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "h"(ctaMask)
      : "memory");
}
__device__ __forceinline__ uint32_t clusterRank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
/// An arrival on the barrier at `bar` in CTA `rank` of the cluster.
__device__ __forceinline__ void barrierArriveIn(uint32_t bar, uint32_t rank) {
  asm volatile("{\n.reg .b32 remote;\n"
               "mapa.shared::cluster.u32 remote, %0, %1;\n"
               "mbarrier.arrive.release.cluster.shared::cluster.b64 _, "
               "[remote];\n}\n" ::"r"(bar),
               "r"(rank)
               : "memory");
}
/// Every thread of every CTA of the cluster.
__device__ __forceinline__ void clusterSync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}

/// v rounded to T and back (what a GEMM's store leaves).
template <typename T> __device__ __forceinline__ float toStored(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(__float2bfloat16_rn(v));
  else
    return __half2float(__float2half_rn(v));
}
/// Two adjacent elements, each rounded to nearest even.
template <typename T>
__device__ __forceinline__ void storePair(T *out, float v0, float v1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    *reinterpret_cast<__nv_bfloat162 *>(out) = __floats2bfloat162_rn(v0, v1);
  else
    *reinterpret_cast<__half2 *>(out) = __floats2half2_rn(v0, v1);
}
/// A shared-memory matrix descriptor, 128-byte swizzle: the start address,
/// the leading and the stride byte offsets (PTX ISA, "Matrix Descriptor").
__device__ __forceinline__ uint64_t descriptor(uint32_t address,
                                               uint32_t leadingBytes,
                                               uint32_t strideBytes) {
  return uint64_t((address & 0x3FFFF) >> 4) |
         uint64_t((leadingBytes >> 4) & 0x3FFF) << 16 |
         uint64_t((strideBytes >> 4) & 0x3FFF) << 32 | uint64_t(1) << 62;
}

/// Ping-pong's order: a warpgroup starts the products of its tile (the
/// CTA's `mine`-th) only once the other one has waited for every stage of
/// the tile before it. Without it, a warpgroup that skipped the other's
/// tile could wait on a stage's barrier two or more fills ahead of the
/// producer, where the phase parity it waits for already reads complete.
/// orderBars[w] completes once per tile of warpgroup w (its thread 0).
__device__ __forceinline__ void
waitForThePreviousTile(uint32_t orderBars, int consumer, int64_t mine) {
  if (mine == 0)
    return;
  const int other = 1 - consumer;
  // Tile mine - 1 is the other's ((mine - 1 - other) / 2)-th.
  const int64_t theirs = (mine - 1 - other) / 2;
  barrierWait(orderBars + 8 * other, static_cast<uint32_t>(theirs & 1));
}

/// wgmma.mma_async m64nBNk16 with fp32 accumulators (BN / 2 registers per
/// thread), A and B from shared memory, D += A B; TransA: A is M-major,
/// TransB: B is N-major.
/// One specialization per dtype and width: the register list is spelled out.
template <typename T, int BN> struct Wgmma;
// The register lists of m64n128 (64 accumulators) and m64n256 (128).
// clang-format off
#define FLEX_WGMMA_D64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FLEX_WGMMA_OUT64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define FLEX_WGMMA_D128 FLEX_WGMMA_D64 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define FLEX_WGMMA_OUT128 FLEX_WGMMA_OUT64, \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
/// One specialization per dtype and width; the predicate p (scale-d) is
/// true: D += A B.
#define FLEX_WGMMA(TYPE, PTX, BN, REGS, OUTS, A, B, TA, TB)                    \
  template <> struct Wgmma<TYPE, BN> {                                          \
    template <int TransA, int TransB>                                           \
    static __device__ __forceinline__ void run(float (&d)[BN / 2], uint64_t a, \
                                               uint64_t b) {                    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                   \
                   "wgmma.mma_async.sync.aligned.m64n" #BN "k16.f32." PTX     \
                   "." PTX " {" REGS "}, %" #A ", %" #B ", p, 1, 1, %" #TA     \
                   ", %" #TB ";\n}\n"                                          \
                   : OUTS                                                       \
                   : "l"(a), "l"(b), "n"(TransA), "n"(TransB));                 \
    }                                                                           \
  };
FLEX_WGMMA(__nv_bfloat16, "bf16", 128, FLEX_WGMMA_D64, FLEX_WGMMA_OUT64, 64, 65, 66, 67)
FLEX_WGMMA(__half, "f16", 128, FLEX_WGMMA_D64, FLEX_WGMMA_OUT64, 64, 65, 66, 67)
FLEX_WGMMA(__nv_bfloat16, "bf16", 256, FLEX_WGMMA_D128, FLEX_WGMMA_OUT128, 128, 129, 130, 131)
FLEX_WGMMA(__half, "f16", 256, FLEX_WGMMA_D128, FLEX_WGMMA_OUT128, 128, 129, 130, 131)
#undef FLEX_WGMMA
#undef FLEX_WGMMA_D64
#undef FLEX_WGMMA_OUT64
#undef FLEX_WGMMA_D128
#undef FLEX_WGMMA_OUT128
// clang-format on
#endif // FLEX_HOPPER_GEMM

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

/// Rows of 128-row M tiles per raster band: consecutive tiles walk a band's
/// M tiles first, then its N tiles, so the CTAs running at once share B's
/// column tiles and a band's A rows (a weight too large for L2 is then read
/// about once per band instead of once per M tile).
constexpr int64_t kRasterM = 8;

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
  constexpr int64_t BandM = kRasterM / Cluster, TileRows = kTileM * Cluster;
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
template <typename T, int BN, int Stages, bool BKMajor, bool PingPong,
          bool Glu = false, bool Gather = false, int Cluster = 1>
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

  const int64_t mTiles = totalMTiles<kTileM * Cluster>(p);
  const int32_t nTiles = static_cast<int32_t>((p.n + TileN - 1) / TileN);
  const int64_t tiles = mTiles * nTiles;
  const int kTiles = static_cast<int>((p.k + kTileK - 1) / kTileK);
  // The cluster's tiles: tile t goes to cluster t % clusters.
  const uint32_t rank = Cluster > 1 ? clusterRank() : 0;
  const int64_t cluster = blockIdx.x / Cluster, clusters = gridDim.x / Cluster;

  if (threadIdx.x == 0) {
    for (int s = 0; s < Stages; ++s) {
      // The producer thread's expected bytes, and with a gathered A each
      // producer thread's copies (cp.async.mbarrier.arrive.noinc).
      barrierInit(fullBars + 8 * s, Gather ? 1 + 128 : 1);
      // One arrival per consumer warp on the stage, of every CTA of the
      // cluster (their multicasts write into this CTA's stage).
      barrierInit(emptyBars + 8 * s, (PingPong ? 4 : 8) * Cluster);
    }
    barrierInit(orderBars, 1);
    barrierInit(orderBars + 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // The peer's multicasts and arrivals need this CTA's barriers ready.
  if constexpr (Cluster > 1)
    clusterSync();
  else
    __syncthreads();

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
    // In a cluster, the CTA stays until every consumer of the cluster has
    // released its last stages: the peer's arrivals land in this CTA's
    // barriers (its multicasts land before this CTA's consumers finish).
    if (Cluster > 1 && threadIdx.x == 0)
      for (int i = 0; i < Stages; ++i, ++step)
        barrierWait<true>(emptyBars + 8 * (step % Stages),
                          ((step / Stages) & 1) ^ 1);
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
  // A stage goes back once this warp's products from it are done (the
  // warp's wgmma.wait_group): lane 0 arrives on the stage's empty barrier
  // in every CTA of the cluster.
  auto release = [&](uint32_t s) {
    if (lane != 0)
      return;
    if constexpr (Cluster == 1) {
      barrierArrive(emptyBars + 8 * s);
    } else {
#pragma unroll
      for (uint32_t cta = 0; cta < Cluster; ++cta)
        barrierArriveIn(emptyBars + 8 * s, cta);
    }
  };
  int64_t mine = 0; // this CTA's tiles so far
  for (int64_t t = cluster; t < tiles; t += clusters, ++mine) {
    if (PingPong && (mine & 1) != consumer) {
      step += kTiles; // the other warpgroup's tile
      continue;
    }
    if constexpr (PingPong)
      waitForThePreviousTile(orderBars, consumer, mine);
    const TileWork w = tileAt<Cluster>(p, t, mTiles, nTiles, TileN, rank);
#pragma unroll
    for (int h = 0; h < Blocks; ++h)
#pragma unroll
      for (int i = 0; i < BN / 2; ++i)
        acc[h][i] = 0.0f;
    for (int kt = 0; kt < kTiles; ++kt, ++step) {
      const uint32_t s = step % Stages;
      barrierWait(fullBars + 8 * s, (step / Stages) & 1);
      // A gathered A was written by cp.async (the generic proxy); wgmma
      // reads through the async proxy.
      if constexpr (Gather)
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      const uint32_t a = stages + s * L::StageBytes + firstRow * 128;
      const uint32_t b = stages + s * L::StageBytes + L::ABytes;
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
        release((step - 1) % Stages);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    if (kTiles > 0)
      release((step - 1) % Stages);
    if (PingPong && t128 == 0)
      barrierArrive(orderBars + 8 * consumer); // this tile's stages are in

      // The accumulators of m64nBNk16: thread t of the warpgroup holds rows
      // 16 * warp + lane / 4 (+ 8), columns 8 * j + 2 * (lane % 4) (+ 1).
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
            p.bias ? static_cast<const T *>(p.bias) + int64_t(w.group) * p.n
                   : nullptr;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int64_t col = w.n0 + 8 * j + 2 * (lane % 4);
          if (col >= p.n)
            continue;
          float v0 = acc[h][4 * j + 2 * half],
                v1 = acc[h][4 * j + 2 * half + 1];
          if (p.accumulate) {
            v0 += float(out[col]);
            v1 += float(out[col + 1]);
          } else if (p.activationInput) {
            // As activationBackward: the stored product times the
            // derivative at the forward's pre-activation value.
            const T *input = static_cast<const T *>(p.activationInput) + at;
            v0 = toStored<T>(v0) *
                 detail::activationDerivative(p.derivative, float(input[col]));
            v1 = toStored<T>(v1) * detail::activationDerivative(
                                       p.derivative, float(input[col + 1]));
          } else if (p.fusedEpilogue) {
            // As applyGemmEpilogue: from the stored product, fp32 math.
            v0 = toStored<T>(v0);
            v1 = toStored<T>(v1);
            if (bias) {
              v0 = __fadd_rn(v0, __fmul_rn(float(bias[col]), p.biasScale));
              v1 = __fadd_rn(v1, __fmul_rn(float(bias[col + 1]), p.biasScale));
            }
            if (p.pre)
              storePair(static_cast<T *>(p.pre) + at + col, v0, v1);
            v0 = detail::applyEpilogue(p.epilogue, v0);
            v1 = detail::applyEpilogue(p.epilogue, v1);
          }
          storePair(out + col, v0, v1);
        }
      }
  }
#endif
}

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

  if (threadIdx.x == 0) {
    for (int s = 0; s < Stages; ++s) {
      barrierInit(fullBars + 8 * s, 1);
      // One arrival per consumer warp on the stage, of every CTA of the
      // cluster.
      barrierInit(emptyBars + 8 * s, (PingPong ? 4 : 8) * Cluster);
    }
    barrierInit(orderBars, 1);
    barrierInit(orderBars + 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (Cluster > 1)
    clusterSync();
  else
    __syncthreads();

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
    // In a cluster, the CTA stays until every consumer of the cluster has
    // released its last stages (raggedMKernel's reason).
    if constexpr (Cluster > 1)
      for (int i = 0; i < Stages; ++i, ++step)
        barrierWait<true>(emptyBars + 8 * (step % Stages),
                          ((step / Stages) & 1) ^ 1);
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
  // A stage goes back once this warp's products from it are done: lane 0
  // arrives on its empty barrier in every CTA of the cluster.
  auto release = [&](uint32_t s) {
    if (lane != 0)
      return;
    if constexpr (Cluster == 1) {
      barrierArrive(emptyBars + 8 * s);
    } else {
#pragma unroll
      for (uint32_t cta = 0; cta < Cluster; ++cta)
        barrierArriveIn(emptyBars + 8 * s, cta);
    }
  };
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
#pragma unroll
    for (int h = 0; h < Blocks; ++h)
#pragma unroll
      for (int i = 0; i < BN / 2; ++i)
        acc[h][i] = 0.0f;
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
        release((step - 1) % Stages);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    if (kTiles > 0)
      release((step - 1) % Stages);
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

/// A persistent launch of `kernel` in clusters of Cluster CTAs: one CTA per
/// SM of `ctas`, as many clusters as fit at once (a GPC's SMs pair up), at
/// most `bound` (the tiles' upper bound, in cluster tiles). (The kernel is
/// a template argument: its count of clusters that fit is its own.)
template <int Cluster, auto kernel, typename... Args>
cudaError_t launchPersistent(int bytes, int64_t bound, int ctas,
                             cudaStream_t stream, const Args &...args) {
  if (bound <= 0)
    return cudaSuccess;
  int64_t clusters = ctas / Cluster;
  if (clusters <= 0) // (fewer SMs than a cluster: nothing would run)
    return cudaErrorInvalidConfiguration;
  clusters = bound < clusters ? bound : clusters;
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = Cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = Cluster > 1 ? 1 : 0;
  if constexpr (Cluster > 1) {
    // How many clusters fit at once, asked once per device (more would
    // only queue); a failed query is asked again next time.
    static std::atomic<int> fitOf[16] = {};
    int device = 0;
    if (cudaError_t e = cudaGetDevice(&device))
      return e;
    int fit = device < 16 ? fitOf[device].load() : 0;
    if (fit <= 0) {
      config.gridDim = dim3(static_cast<unsigned>(clusters * Cluster));
      if (cudaError_t e = cudaOccupancyMaxActiveClusters(&fit, kernel, &config))
        return e;
      if (fit <= 0)
        return cudaErrorLaunchOutOfResources;
      if (device < 16)
        fitOf[device].store(fit);
    }
    clusters = fit < clusters ? fit : clusters;
  }
  config.gridDim = dim3(static_cast<unsigned>(clusters * Cluster));
  return cudaLaunchKernelEx(&config, kernel, args...);
}

/// One persistent launch: `ctas` CTAs (at most one per SM), or fewer when
/// the tiles' upper bound (rowBound / TileRows + groups M tiles) is smaller. A
/// cluster of 2 runs as many clusters as fit at once (a GPC's SMs pair up).
template <typename T, int BN, int Stages, bool BKMajor, bool PingPong,
          bool Glu = false, bool Gather = false, int Cluster = 1>
cudaError_t launchRaggedM(const CUtensorMap &mapA, const CUtensorMap &mapB,
                          const CUtensorMap &mapUp, const RaggedMParams &p,
                          int ctas, cudaStream_t stream) {
  constexpr auto kernel =
      raggedMKernel<T, BN, Stages, BKMajor, PingPong, Glu, Gather, Cluster>;
  constexpr int bytes = Layout<BN, Stages>::SharedBytes;
  static const cudaError_t registers = startRegistersOf(kernel);
  if (registers != cudaSuccess)
    return registers;
  if (cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))
    return e;
  constexpr int TileN = Glu ? BN / 2 : BN;
  constexpr int64_t TileRows = kTileM * Cluster;
  const int64_t bound = ((p.rowBound + TileRows - 1) / TileRows + p.groups) *
                        ((p.n + TileN - 1) / TileN);
  return launchPersistent<Cluster, kernel>(bytes, bound, ctas, stream, mapA,
                                           mapB, mapUp, p);
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
  static const cudaError_t registers = startRegistersOf(kernel);
  if (registers != cudaSuccess)
    return registers;
  if (cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))
    return e;
  const int64_t bound = ((p.k + kTileM * Cluster - 1) / (kTileM * Cluster)) *
                        ((p.n + BN - 1) / BN) * int64_t(p.groups);
  return launchPersistent<Cluster, kernel>(bytes, bound, ctas, stream, mapA,
                                           mapGradC, p);
}

} // namespace flex::cuda::hopper

#endif // LIB_RUNTIME_CUDA_HOPPERGEMMKERNEL_CUH
