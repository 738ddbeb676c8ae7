//===- MmaSyncPrimitives.cuh - The mma.sync kernel's pieces --*- CUDA -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// What DeviceGroupedGemm.cu's mma.sync kernel is built of (sm_80+): padded
// shared-memory operand tiles, cp.async copies and their groups, ldmatrix,
// mma.m16n8k16 for bf16 and f16, and a tile's guarded load. CUDA headers
// only.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_MMASYNCPRIMITIVES_CUH
#define LIB_RUNTIME_CUDA_MMASYNCPRIMITIVES_CUH

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// cp.async and bf16 mma need sm_80; CI builds for the toolkit's default
// architecture too, where the kernels compile to a trap and
// deviceGroupedGemmApplies refuses (it checks the binary's version).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FLEX_GEMM_UNSUPPORTED_ARCH 1
#pragma nv_diag_suppress 177 // the helpers the trap leaves unused
#endif

namespace flex::cuda::detail {

/// Shared-memory rows are padded by 8 elements (16 bytes): the 8 rows an
/// ldmatrix reads then fall on distinct banks.
constexpr int kPad = 8;

/// An operand tile in shared memory: [Outer][Inner + kPad], Inner contiguous
/// in global memory too.
template <int Outer, int Inner> struct OperandTile {
  static constexpr int Stride = Inner + kPad;
  static constexpr int Elements = Outer * Stride;
};

__device__ __forceinline__ uint32_t sharedAddress(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void copyAsync16(void *smem, const void *global,
                                            bool valid) {
#ifndef FLEX_GEMM_UNSUPPORTED_ARCH
  // src-size 0 fills the 16 bytes with zeros and reads nothing.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   sharedAddress(smem)),
               "l"(global), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void commitAsync() {
#ifndef FLEX_GEMM_UNSUPPORTED_ARCH
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int Pending> __device__ __forceinline__ void waitAsync() {
#ifndef FLEX_GEMM_UNSUPPORTED_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

__device__ __forceinline__ void loadMatrixX4(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(sharedAddress(p)));
}
__device__ __forceinline__ void loadMatrixX4Trans(uint32_t (&r)[4],
                                                  const void *p) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(sharedAddress(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void
mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                        uint32_t b1) {
#ifndef FLEX_GEMM_UNSUPPORTED_ARCH
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4],
                                                 const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
#ifndef FLEX_GEMM_UNSUPPORTED_ARCH
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

/// Loads the [Outer, Inner] tile at `global` (row stride ld) into `smem`;
/// rows >= outerValid and columns >= innerValid (a multiple of 8) read as
/// zeros. `fallback` is any readable address (cp.async needs one even when
/// it reads nothing). With `outerIndex` (a gathered A), outer row i is row
/// outerIndex[i] of `global`, zeros when that is outside [0, indexBound).
template <typename T, int Outer, int Inner, int Threads,
          int SmemStride = OperandTile<Outer, Inner>::Stride>
__device__ __forceinline__ void
loadTile(T *smem, const T *global, int64_t ld, int64_t outerValid,
         int64_t innerValid, const T *fallback,
         const int32_t *outerIndex = nullptr, int64_t indexBound = 0) {
  constexpr int ChunksPerRow = Inner / 8;
  constexpr int Chunks = Outer * ChunksPerRow;
  static_assert(Chunks % Threads == 0 || Chunks < Threads);
#pragma unroll
  for (int i = threadIdx.x; i < Chunks; i += Threads) {
    int row = i / ChunksPerRow, col = (i % ChunksPerRow) * 8;
    bool valid = row < outerValid && col < innerValid;
    int64_t outer = row;
    if (outerIndex && valid) {
      outer = outerIndex[row];
      valid = outer >= 0 && outer < indexBound;
    }
    const T *src = valid ? global + outer * ld + col : fallback;
    copyAsync16(smem + row * SmemStride + col, src, valid);
  }
}

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_MMASYNCPRIMITIVES_CUH
