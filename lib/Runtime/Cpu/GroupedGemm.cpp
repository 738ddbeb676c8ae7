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

#include <cstring>
#include <vector>

namespace flex::cpu {

namespace {

/// The A rows of one expert: a's own rows from `firstRow` on, or (gathered)
/// a copy of the tokens' rows `gather` names, in `staging`. The copy is
/// exact, so a gathered GEMM computes bit for bit what the GEMM over
/// dispatch's rows does. A token outside [0, tokens) reads zeros.
ReadBuffer expertRows(ReadBuffer a, int64_t firstRow, int64_t rows, int64_t k,
                      const RowGather &gather, std::vector<char> &staging,
                      int64_t &aRow) {
  aRow = firstRow;
  if (!gather.rowTokens)
    return a;
  const auto rowBytes = static_cast<size_t>(k) * dtypeSize(a.type);
  staging.assign(static_cast<size_t>(rows) * rowBytes, 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t token = gather.rowTokens[firstRow + r];
    if (token >= 0 && token < gather.tokens)
      std::memcpy(staging.data() + r * rowBytes,
                  static_cast<const char *>(a.data) + token * rowBytes,
                  rowBytes);
  }
  aRow = 0;
  return ReadBuffer{staging.data(), a.type};
}

} // namespace

void groupedGemm(ReadBuffer a, ReadBuffer b, ReadBuffer bias, WriteBuffer c,
                 int64_t k, int64_t n, const ExpertSegments &segments,
                 const GroupedGemmOptions &options, WriteBuffer pre,
                 const RowGather &gather) {
  std::vector<char> staging;
  // Experts run one after another: OpenBLAS threads each GEMM, and BLAS
  // calls must not be nested in OpenMP regions.
  for (int64_t e = 0; e < segments.experts; ++e) {
    int64_t rows = segments.rows[e];
    if (rows <= 0)
      continue;
    int64_t firstRow = segments.offsets[e], aRow = 0;
    ReadBuffer rowsOfA =
        expertRows(a, firstRow, rows, k, gather, staging, aRow);
    detail::typedGemm(rowsOfA, aRow, b, e * k * n, bias, e * n, c, firstRow,
                      pre, rows, k, n, options);
  }
}

void groupedGemmWgrad(ReadBuffer a, ReadBuffer gradC, int64_t k, int64_t n,
                      const ExpertSegments &segments, WriteBuffer gradB,
                      WriteBuffer gradBias,
                      const GroupedGemmWgradOptions &options,
                      const RowGather &gather) {
  std::vector<char> staging;
  for (int64_t e = 0; e < segments.experts; ++e) {
    int64_t rows = std::max<int64_t>(0, segments.rows[e]);
    int64_t firstRow = segments.offsets[e], aRow = 0;
    ReadBuffer rowsOfA =
        rows > 0 ? expertRows(a, firstRow, rows, k, gather, staging, aRow) : a;
    // typedWgrad reads a and gradC from one row: gradC's rows are the
    // expert's in the dispatch layout, a's the staged copy's.
    detail::typedWgrad(rowsOfA, gradC, firstRow, rows, k, n, gradB, e * k * n,
                       gradBias, e * n, options.accumulate,
                       rows > 0 ? aRow : firstRow);
  }
}

} // namespace flex::cpu
