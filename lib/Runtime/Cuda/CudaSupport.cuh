//===- CudaSupport.cuh - Shared pieces of the CUDA kernels ------*- CUDA -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines what the CUDA kernels share: typed loads and stores (fp32
// math, one round-to-nearest-even per store, as the CPU kernels), dispatch on
// the storage type, the activations, and the map from a row of a
// dispatch-shaped buffer to its expert.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_CUDASUPPORT_CUH
#define LIB_RUNTIME_CUDA_CUDASUPPORT_CUH

#include "Activations.cuh"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace flex::cuda::detail {

//===----------------------------------------------------------------------===//
// Storage types
//===----------------------------------------------------------------------===//

__device__ __forceinline__ float toFloat(float v) { return v; }
__device__ __forceinline__ float toFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float toFloat(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T fromFloat(float v);
template <> __device__ __forceinline__ float fromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half fromFloat<__half>(float v) {
  return __float2half_rn(v);
}

/// Elements of T in 16 bytes: the unit of the vectorized copies.
template <typename T> constexpr int kVector = 16 / sizeof(T);

/// Loads kVector<T> elements at p (16-byte aligned) as fp32.
template <typename T>
__device__ __forceinline__ void loadVector(const T *p, float *out) {
  uint4 raw = *reinterpret_cast<const uint4 *>(p);
  const T *values = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int i = 0; i < kVector<T>; ++i)
    out[i] = toFloat(values[i]);
}

template <typename T>
__device__ __forceinline__ void storeVector(T *p, const float *in) {
  uint4 raw;
  T *values = reinterpret_cast<T *>(&raw);
#pragma unroll
  for (int i = 0; i < kVector<T>; ++i)
    values[i] = fromFloat<T>(in[i]);
  *reinterpret_cast<uint4 *>(p) = raw;
}

/// Whether rows of `width` elements of T at these addresses allow 16-byte
/// accesses.
inline bool vectorizable(int64_t width, size_t elementBytes,
                         std::initializer_list<const void *> pointers) {
  if ((width * static_cast<int64_t>(elementBytes)) % 16 != 0)
    return false;
  for (const void *p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
      return false;
  return true;
}

/// Calls fn(T{}) with T the storage type of `type` (F32, BF16 or F16).
template <typename Fn> Status withType(DType type, Fn &&fn) {
  switch (type) {
  case DType::F32:
    return fn(float{});
  case DType::BF16:
    return fn(__nv_bfloat16{});
  case DType::F16:
    return fn(__half{});
  case DType::I32:
    break;
  }
  return Status(StatusCode::Internal,
                "a float buffer (f32, bf16 or f16) was expected; got i32");
}

//===----------------------------------------------------------------------===//
// Rows of dispatch-shaped buffers
//===----------------------------------------------------------------------===//

/// The kernel-side copy of ExpertRowSpace.
struct RowSpace {
  const int32_t *offsets;
  const int32_t *rows;
  int32_t experts;
  int64_t staticCapacity; ///< -1 when dynamic

  /// Rows a kernel visits: E * C when static, else the declared bound.
  static int64_t launchRows(const ExpertRowSpace &space) {
    return space.isStatic() ? space.experts * space.staticCapacity
                            : space.rowBound;
  }

  /// offsets[E] for a dynamic routing (the end of its last segment), else
  /// null: the bound of usedRows.
  __device__ __forceinline__ const int32_t *segmentsEnd() const {
    return staticCapacity < 0 && experts > 0 ? offsets + experts : nullptr;
  }

  /// The expert of `row`, or -1 when the row is not touched (a dynamic
  /// routing's padding or unused tail).
  __device__ __forceinline__ int32_t expertOf(int64_t row) const {
    if (staticCapacity >= 0)
      return staticCapacity > 0 ? static_cast<int32_t>(row / staticCapacity)
                                : -1;
    // Offsets are non-decreasing: the last expert whose segment starts at
    // or before the row.
    int32_t lo = 0, hi = experts - 1;
    while (lo < hi) {
      int32_t mid = (lo + hi + 1) / 2;
      if (offsets[mid] <= row)
        lo = mid;
      else
        hi = mid - 1;
    }
    int64_t first = offsets[lo];
    if (row < first || row >= first + rows[lo])
      return -1;
    return lo;
  }
};

/// The rows a dispatch-shaped kernel visits: all `rows` the buffer declares,
/// or, for a dynamic routing, those up to the last segment's end (offsets[E],
/// read on the device; `rowsEnd` null for a static one): a padded layout's
/// E * C with the C of this call, not the worst-case bound (for dropless
/// E x T rows, which no one reads: zeroing them made a dispatch 7x slower on
/// an H100, Run 17's l16).
__device__ __forceinline__ int64_t usedRows(int64_t rows,
                                            const int32_t *rowsEnd) {
  if (!rowsEnd)
    return rows;
  int64_t end = *rowsEnd;
  return end < 0 ? 0 : (end < rows ? end : rows);
}

inline RowSpace toKernel(const ExpertRowSpace &space) {
  return {space.offsets, space.rows, static_cast<int32_t>(space.experts),
          space.staticCapacity};
}

inline unsigned gridFor(int64_t work, int64_t perBlock, int64_t cap = 1 << 20) {
  int64_t blocks = (work + perBlock - 1) / perBlock;
  if (blocks < 1)
    blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

/// The row of slot (t, j) = t * k + j in the dispatch buffer, or -1 when
/// dropped (dispatch, combine and grouped_gemm_combine's store).
__device__ __forceinline__ int64_t keptRow(const Routing &routing,
                                           int64_t slot) {
  int32_t location = routing.locations[slot];
  if (location < 0 || location >= *routing.capacity)
    return -1;
  return int64_t{routing.expertOffsets[routing.indices[slot]]} + location;
}

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_CUDASUPPORT_CUH
