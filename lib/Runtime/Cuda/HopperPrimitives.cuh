//===- HopperPrimitives.cuh - The wgmma kernels' pieces -----*- CUDA -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// What HopperGemmKernel.cuh's kernels are built of: mbarriers (with the
// 20 s wait limit), TMA loads (multicast too), clusters, wgmma and its
// shared-memory descriptors, the producer / consumer register split, and
// the stage ring's set-up, release and drain. CUDA headers only; sm_90a
// (FLEX_HOPPER_GEMM) for the device pieces.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_HOPPERPRIMITIVES_CUH
#define LIB_RUNTIME_CUDA_HOPPERPRIMITIVES_CUH

#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
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

#ifdef FLEX_HOPPER_GEMM
__device__ __forceinline__ uint32_t smemAddress(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
/// Shared memory by its 32-bit address (ld/st.shared: a generic pointer
/// would cost the address-space check per access).
__device__ __forceinline__ void storeShared(uint32_t address, float a,
                                            float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(address), "f"(a),
               "f"(b)
               : "memory");
}
__device__ __forceinline__ float4 loadShared(uint32_t address) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(address)
               : "memory");
  return v;
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
/// The clock is read once per kBarrierClockTries failed tries, not per try:
/// a stage's hand-off then costs the try_wait alone (call 34 measured every
/// wgmma form 1.5-2.2x slower than Run 32 with a read per try; the suspect).
constexpr uint32_t kBarrierClockTries = 4096;
template <bool ClusterScope = false>
__device__ __forceinline__ void barrierWait(uint32_t bar, uint32_t parity) {
  uint64_t start = 0;
  for (uint32_t tries = 1; !barrierTryWait<ClusterScope>(bar, parity);
       ++tries) {
    if (tries % kBarrierClockTries != 0)
      continue;
    const uint64_t now = globalNanoseconds();
    if (start == 0)
      start = now;
    else if (now - start > kBarrierWaitLimitNs)
      __trap();
  }
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
/// An arrival on the barrier at `bar` in CTA `rank` of the cluster. The
/// arrival's default semantics (release at CTA scope), as CUTLASS's cluster
/// barriers arrive: a consumer gives back a stage it only read, through
/// wgmma (done at its wait_group), so it has no writes for a cluster-scope
/// release to order, and that release sat on the consumers' path once per
/// stage (Run 35: every 2-CTA form about 2x slower than the same tile
/// alone; the suspect).
__device__ __forceinline__ void barrierArriveIn(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
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
/// Two adjacent elements of T as fp32.
template <typename T>
__device__ __forceinline__ void loadPair(const T *in, float &v0, float &v1) {
  float2 v;
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(in));
  else
    v = __half22float2(*reinterpret_cast<const __half2 *>(in));
  v0 = v.x;
  v1 = v.y;
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
/// Every thread of the warpgroup calls it, and after the wait the
/// warpgroup's four warps meet (named barrier 1 + consumer), so thread 0
/// arrives for this tile only once every warp has seen the other's phase:
/// a weight gradient's tile of an expert without rows has no wgmma to
/// converge on, and without the meeting thread 0 arrived for tiles ahead,
/// the other warpgroup completed its next phase too, and a warp that had
/// not yet polled waited on a parity two phases old, incomplete forever
/// (the ping-pong weight gradient's hang on 70 experts, accumulating).
__device__ __forceinline__ void
waitForThePreviousTile(uint32_t orderBars, int consumer, int64_t mine) {
  if (mine == 0)
    return;
  const int other = 1 - consumer;
  // Tile mine - 1 is the other's ((mine - 1 - other) / 2)-th.
  const int64_t theirs = (mine - 1 - other) / 2;
  barrierWait(orderBars + 8 * other, static_cast<uint32_t>(theirs & 1));
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + consumer) : "memory");
}

/// A tile's fp32 accumulators to zero before its first product (the forward
/// and the weight gradient both).
template <int Blocks, int N>
__device__ __forceinline__ void zeroAccumulators(float (&acc)[Blocks][N]) {
#pragma unroll
  for (int h = 0; h < Blocks; ++h)
#pragma unroll
    for (int i = 0; i < N; ++i)
      acc[h][i] = 0.0f;
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
/// The stages' barriers of a persistent kernel: full (fullCount arrivals
/// and the bytes expected), empty (one arrival per consumer warp of every
/// CTA of the cluster), and the ping-pong order's two; then every CTA of
/// the cluster waits for all of them (the peer's multicasts and arrivals
/// land in this CTA's barriers).
template <int Stages, int Cluster>
__device__ __forceinline__ void
setUpStageBarriers(uint32_t fullBars, uint32_t emptyBars, uint32_t orderBars,
                   uint32_t fullCount, uint32_t consumerWarps) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < Stages; ++s) {
      barrierInit(fullBars + 8 * s, fullCount);
      barrierInit(emptyBars + 8 * s, consumerWarps * Cluster);
    }
    barrierInit(orderBars, 1);
    barrierInit(orderBars + 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (Cluster > 1)
    clusterSync();
  else
    __syncthreads();
}

/// A consumer warp gives stage `s` back once its products from it are
/// done (its wgmma.wait_group): lane 0 arrives on the stage's empty barrier
/// in every CTA of the cluster.
template <int Cluster>
__device__ __forceinline__ void releaseStage(uint32_t emptyBars, uint32_t s,
                                             int lane) {
  if (lane != 0)
    return;
  if constexpr (Cluster == 1) {
    barrierArrive(emptyBars + 8 * s);
  } else {
#pragma unroll
    for (uint32_t cta = 0; cta < Cluster; ++cta)
      barrierArriveIn(emptyBars + 8 * s, cta);
  }
}

/// The producer of a cluster's CTA, past its last load at `step`: the CTA
/// stays until every consumer of the cluster has released its last stages,
/// since the peer's arrivals land in this CTA's barriers (its multicasts
/// land before this CTA's consumers finish).
template <int Stages>
__device__ __forceinline__ void waitOutTheCluster(uint32_t emptyBars,
                                                  uint32_t step) {
  for (int i = 0; i < Stages; ++i, ++step)
    barrierWait<true>(emptyBars + 8 * (step % Stages),
                      ((step / Stages) & 1) ^ 1);
}
#endif // FLEX_HOPPER_GEMM

} // namespace flex::cuda::hopper

#endif // LIB_RUNTIME_CUDA_HOPPERPRIMITIVES_CUH
