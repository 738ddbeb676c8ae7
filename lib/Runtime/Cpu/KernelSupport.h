//===- KernelSupport.h - Shared pieces of the CPU kernels -------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines what the CPU kernels share: typed row loads and stores
// (fp32 math, one rounding per store), the activation functions and their
// derivatives, the iteration over valid expert rows, and the fp32 GEMM entry.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CPU_KERNELSUPPORT_H
#define LIB_RUNTIME_CPU_KERNELSUPPORT_H

#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Cpu/CpuKernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace flex::cpu::detail {

/// Reads n elements starting at element `offset` of `buffer` as fp32.
inline void loadRow(ReadBuffer buffer, int64_t offset, int64_t n, float *dst) {
  switch (buffer.type) {
  case DType::F32:
    std::memcpy(dst, static_cast<const float *>(buffer.data) + offset,
                static_cast<size_t>(n) * sizeof(float));
    return;
  case DType::BF16: {
    const uint16_t *src = static_cast<const uint16_t *>(buffer.data) + offset;
    for (int64_t i = 0; i < n; ++i)
      dst[i] = bf16ToFloat(src[i]);
    return;
  }
  case DType::F16: {
    const uint16_t *src = static_cast<const uint16_t *>(buffer.data) + offset;
    for (int64_t i = 0; i < n; ++i)
      dst[i] = f16ToFloat(src[i]);
    return;
  }
  case DType::I32:
    break;
  }
  __builtin_trap(); // i32 is never a typed float buffer.
}

inline void loadRow(WriteBuffer buffer, int64_t offset, int64_t n, float *dst) {
  loadRow(ReadBuffer{buffer.data, buffer.type}, offset, n, dst);
}

/// Writes n fp32 values at element `offset` of `buffer`, rounding once.
inline void storeRow(WriteBuffer buffer, int64_t offset, int64_t n,
                     const float *src) {
  switch (buffer.type) {
  case DType::F32:
    std::memcpy(static_cast<float *>(buffer.data) + offset, src,
                static_cast<size_t>(n) * sizeof(float));
    return;
  case DType::BF16: {
    uint16_t *dst = static_cast<uint16_t *>(buffer.data) + offset;
    for (int64_t i = 0; i < n; ++i)
      dst[i] = floatToBf16(src[i]);
    return;
  }
  case DType::F16: {
    uint16_t *dst = static_cast<uint16_t *>(buffer.data) + offset;
    for (int64_t i = 0; i < n; ++i)
      dst[i] = floatToF16(src[i]);
    return;
  }
  case DType::I32:
    break;
  }
  __builtin_trap();
}

inline void storeZeros(WriteBuffer buffer, int64_t offset, int64_t n) {
  // +0.0 is all-zero bits in f32, bf16 and f16.
  std::memset(static_cast<char *>(buffer.data) +
                  offset * static_cast<int64_t>(dtypeSize(buffer.type)),
              0, static_cast<size_t>(n) * dtypeSize(buffer.type));
}

//===----------------------------------------------------------------------===//
// Activations
//===----------------------------------------------------------------------===//

// NaN propagates through every activation (relu included, as in PyTorch).
inline float reluForward(float v) { return v > 0.0f || v != v ? v : 0.0f; }
inline float reluDerivative(float v) { return v > 0.0f ? 1.0f : 0.0f; }

inline float geluForward(float v) {
  return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
}
inline float geluDerivative(float v) {
  float cdf = 0.5f * (1.0f + std::erf(v * 0.70710678118654752f));
  float pdf = 0.39894228040143268f * std::exp(-0.5f * v * v);
  return cdf + v * pdf;
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }
inline float siluForward(float v) { return v * sigmoid(v); }
inline float siluDerivative(float v) {
  float s = sigmoid(v);
  return s * (1.0f + v * (1.0f - s));
}

inline float applyEpilogue(Epilogue epilogue, float v) {
  switch (epilogue) {
  case Epilogue::None:
    return v;
  case Epilogue::Relu:
    return reluForward(v);
  case Epilogue::Gelu:
    return geluForward(v);
  case Epilogue::Silu:
    return siluForward(v);
  }
  return v;
}

inline float activationDerivative(Activation act, float v) {
  switch (act) {
  case Activation::Relu:
    return reluDerivative(v);
  case Activation::Gelu:
    return geluDerivative(v);
  case Activation::Silu:
    return siluDerivative(v);
  }
  return 0.0f;
}

//===----------------------------------------------------------------------===//
// Valid rows
//===----------------------------------------------------------------------===//

/// A run of consecutive valid rows [begin, end) of one expert.
struct RowRange {
  int64_t begin;
  int64_t end;
  int64_t expert;
};

/// Splits the valid rows of every expert into ranges of at most `maxRows`
/// rows, so a parallel loop over them balances even when one expert holds
/// every row.
std::vector<RowRange> splitValidRows(const ExpertSegments &segments,
                                     int64_t maxRows);

/// Runs fn(range) over the ranges of splitValidRows on OpenMP threads.
template <typename Fn>
void forEachValidRowRange(const ExpertSegments &segments, int64_t rowCost,
                          Fn &&fn) {
  // About 16K elements per task keeps the scheduling overhead small.
  int64_t maxRows = rowCost > 0 ? std::max<int64_t>(1, 16384 / rowCost) : 64;
  std::vector<RowRange> ranges = splitValidRows(segments, maxRows);
  int64_t count = static_cast<int64_t>(ranges.size()), rows = 0;
  for (const RowRange &range : ranges)
    rows += range.end - range.begin;
  // A parallel region for a few rows costs more than the rows: right after
  // OpenBLAS's threads ran a GEMM, waking the OpenMP team took 7-13 ms for
  // an 8 x 6 activation_backward (2 cores), 1000x its work.
  const bool parallel =
      count > 1 && rows * std::max<int64_t>(1, rowCost) >= 65536;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t i = 0; i < count; ++i)
    fn(ranges[i]);
}

//===----------------------------------------------------------------------===//
// GEMM
//===----------------------------------------------------------------------===//

/// fp32 row-major C[M, N] = alpha * op(A)[M, K] * op(B)[K, N] + beta * C,
/// through cblas_sgemm when available (multi-threaded by OpenBLAS); must be
/// called outside OpenMP parallel regions.
void sgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k,
           float alpha, const float *a, int64_t lda, const float *b,
           int64_t ldb, float beta, float *c, int64_t ldc);

/// One dense GEMM over a typed segment: the building block of grouped_gemm,
/// router and router_backward. Rows [aRow, aRow + m) of a[*, k] times b (at
/// element bOffset, [k, n] or [n, k] with transB) plus bias (at biasOffset,
/// may be null) into rows [cRow, cRow + m) of c[*, n] (and pre).
void typedGemm(ReadBuffer a, int64_t aRow, ReadBuffer b, int64_t bOffset,
               ReadBuffer bias, int64_t biasOffset, WriteBuffer c, int64_t cRow,
               WriteBuffer pre, int64_t m, int64_t k, int64_t n,
               const GroupedGemmOptions &options);

/// gradB[k, n] (at gradBOffset) = a[aRow.., k]^T @ gradC[row.., n] over m
/// rows (aRow < 0: a from `row` too); gradBias[n] (at gradBiasOffset, may
/// be null) = column sums.
/// m == 0 writes zeros. With `accumulate` both add to what they hold (m == 0
/// leaves them as they are).
void typedWgrad(ReadBuffer a, ReadBuffer gradC, int64_t row, int64_t m,
                int64_t k, int64_t n, WriteBuffer gradB, int64_t gradBOffset,
                WriteBuffer gradBias, int64_t gradBiasOffset,
                bool accumulate = false, int64_t aRow = -1);

} // namespace flex::cpu::detail

#endif // LIB_RUNTIME_CPU_KERNELSUPPORT_H
