//===- GroupedGemm.cpp - grouped_gemm and grouped_gemm_wgrad --------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the per-expert GEMMs of [expert-1] and their weight
// gradients. Each expert's valid rows are one contiguous GEMM, so padded and
// ragged layouts cost the same and padding rows are never touched.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

namespace flex::cpu {

void groupedGemm(ReadBuffer a, ReadBuffer b, ReadBuffer bias, WriteBuffer c,
                 int64_t k, int64_t n, const ExpertSegments &segments,
                 const GroupedGemmOptions &options, WriteBuffer pre) {
  // Experts run one after another: OpenBLAS threads each GEMM, and BLAS
  // calls must not be nested in OpenMP regions.
  for (int64_t e = 0; e < segments.experts; ++e) {
    int64_t rows = segments.rows[e];
    if (rows <= 0)
      continue;
    int64_t firstRow = segments.offsets[e];
    detail::typedGemm(a, firstRow, b, e * k * n, bias, e * n, c, firstRow, pre,
                      rows, k, n, options);
  }
}

void groupedGemmWgrad(ReadBuffer a, ReadBuffer gradC, int64_t k, int64_t n,
                      const ExpertSegments &segments, WriteBuffer gradB,
                      WriteBuffer gradBias,
                      const GroupedGemmWgradOptions &options) {
  for (int64_t e = 0; e < segments.experts; ++e)
    detail::typedWgrad(a, gradC, segments.offsets[e],
                       std::max<int64_t>(0, segments.rows[e]), k, n, gradB,
                       e * k * n, gradBias, e * n, options.accumulate);
}

} // namespace flex::cpu
