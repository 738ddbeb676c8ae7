//===- GroupedGemm.cpp - grouped_gemm, its glu-fused form and wgrad -------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the per-expert GEMMs of [expert-1], the glu-fused
// first layer of a gated expert, and their weight gradients. Each expert's
// valid rows are one contiguous GEMM, so padded and ragged layouts cost the
// same and padding rows are never touched.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

#include <algorithm>
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

void groupedGemmGlu(ReadBuffer a, ReadBuffer b, ReadBuffer bUp, WriteBuffer c,
                    int64_t k, int64_t n, const ExpertSegments &segments,
                    WriteBuffer gateIn, WriteBuffer upIn,
                    const RowGather &gather) {
  // The reference is the unfused steps themselves, so the two agree bit for
  // bit: two GEMMs rounding into c's dtype, then glu over what they stored.
  // A product the caller does not keep goes to scratch rows [0, span).
  int64_t span = 0;
  for (int64_t e = 0; e < segments.experts; ++e)
    if (segments.rows[e] > 0)
      span = std::max<int64_t>(span, segments.offsets[e] + segments.rows[e]);
  const size_t scratchBytes = static_cast<size_t>(span * n) * dtypeSize(c.type);
  std::vector<char> gateScratch, upScratch;
  auto product = [&](WriteBuffer kept, std::vector<char> &scratch) {
    if (kept.data)
      return kept;
    scratch.resize(scratchBytes);
    return WriteBuffer{scratch.data(), c.type};
  };
  const WriteBuffer gate = product(gateIn, gateScratch);
  const WriteBuffer up = product(upIn, upScratch);
  const GroupedGemmOptions plain;
  groupedGemm(a, b, {}, gate, k, n, segments, plain, {}, gather);
  groupedGemm(a, bUp, {}, up, k, n, segments, plain, {}, gather);
  glu({gate.data, gate.type}, {up.data, up.type}, c, n, segments);
}

void groupedGemmActivationBackward(ReadBuffer a, ReadBuffer b, ReadBuffer pre,
                                   WriteBuffer c, int64_t k, int64_t n,
                                   const ExpertSegments &segments, bool transB,
                                   Activation act) {
  // The reference is the unfused steps themselves: the product rounded into
  // c, then activation_backward over it in place (each row read before it is
  // written).
  GroupedGemmOptions plain;
  plain.transB = transB;
  groupedGemm(a, b, {}, c, k, n, segments, plain);
  activationBackward(pre, {c.data, c.type}, c, n, segments, act);
}

void groupedGemmGluBackward(ReadBuffer a, ReadBuffer b, ReadBuffer gateIn,
                            ReadBuffer upIn, WriteBuffer gradGateIn,
                            WriteBuffer gradUpIn, int64_t k, int64_t n,
                            const ExpertSegments &segments, bool transB) {
  // The product rounded into grad_gate_in, then glu_backward over it in
  // place (each row read before it is written).
  GroupedGemmOptions plain;
  plain.transB = transB;
  groupedGemm(a, b, {}, gradGateIn, k, n, segments, plain);
  gluBackward(gateIn, upIn, {gradGateIn.data, gradGateIn.type}, gradGateIn,
              gradUpIn, n, segments);
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
